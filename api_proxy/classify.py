"""What a request asks of the dispatcher: the pure, I/O-free classifier.

``classify(realm, method, target, headers, body)`` reads only what routing needs and
returns a ``Classified``: the action (login, follow a session, entity-owned call, merged
list, create, ...), the candidate owner identities (``RouteKey``) and the credentials
that name a session.  It never touches the store or the network, so it can be fuzzed
and benchmarked; its invariant is that any input either classifies or raises
``api_proxy.errors.BadRequest``.

Compiled with mypyc with the rest of the fast path (``sip/_pure.py``): keep it fully
annotated, its constants ``Final``, and its msgspec Structs, enums and exceptions in
``calltypes`` (re-exported here).

Realm kinds:
- customer realms (``customer``, ``account``): follow the session, the login, or the
  ``authorized-by-remote`` cookie;
- admin realms (``admin``, ``reseller``, ``distributor``, ``cc_staff``, ``vendor``,
  ``representative``, ``porting``): entity owner first, else merged list, create,
  or the session's context system; a ``porting`` request (API call or not) is owned
  by the DID it names in its query string, its form or JSON body or its API params;
- ``cpe``: the device's MAC (file name, query, TR-069 Inform, a GET's User-Agent), else
  the CWMP cookie.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Final
from urllib.parse import unquote

from api_proxy.apicall import (
    ApiCall,
    api_path,
    content_type,
    form_fields,
    parse_call,
    parse_cookies,
    top_fields,
)
from api_proxy.calltypes import Action, Classified, CpeError, Credentials, RealmKind, RouteKey
from api_proxy.errors import BadRequest

__all__ = [
    "ADMIN_REALMS",
    "CPE_REALMS",
    "CREATE_OWNER_FIELDS",
    "CUSTOMER_REALMS",
    "DEFAULT_COMPILED",
    "DEFAULT_PATTERNS",
    "DID_FIELDS",
    "ENTITY_FIELDS",
    "LOGIN_FIELDS",
    "PASSWORD_FIELDS",
    "REALMS",
    "REMOTE_COOKIE",
    "SYSTEMS",
    "Action",
    "Classified",
    "CpeError",
    "Credentials",
    "RealmKind",
    "RouteKey",
    "classify",
    "compile_patterns",
    "did_keys",
    "entity_keys",
    "inform_device",
    "inform_macs",
    "is_inform",
    "mac_in_target",
    "mac_in_user_agent",
    "needs_body",
    "normalise_mac",
    "realm_kind",
]

REMOTE_COOKIE: Final = "authorized-by-remote"
CUSTOMER_REALMS: Final = frozenset({"customer", "account"})
CPE_REALMS: Final = frozenset({"cpe"})
ADMIN_REALMS: Final = frozenset(
    {"admin", "reseller", "distributor", "cc_staff", "vendor", "representative", "porting"}
)
REALMS: Final = CUSTOMER_REALMS | CPE_REALMS | ADMIN_REALMS
SYSTEMS: Final = ("source", "target")


# --- CPE identities: MACs in file names, TR-069 Inform DeviceIds -----------------------------
#
# Phones and gateways fetch their configuration by MAC (``0004f2a1b2c3.cfg``,
# ``cfg000b82a1b2c3.xml``, ``SEP001122334455.cnf.xml``, ``?mac=00:11:22:33:44:55``); a TR-069
# CPE opens its CWMP session with an ``Inform`` naming its DeviceId.  Both give a ``cpe``
# identity (12 lowercase hex digits).  The Inform is read with bounded regular expressions,
# not an XML parser: the body is untrusted, small (capped before it gets here) and only a
# few elements matter.

_HEX12: Final = re.compile(r"^[0-9a-f]{12}$")
_SEPARATORS: Final = re.compile(r"[\s:\-\.]")

#: Default file-name and query patterns; group 1 is the MAC.
DEFAULT_PATTERNS: Final[tuple[str, ...]] = (
    # ?mac=0004f2a1b2c3, &MAC=00:04:f2:a1:b2:c3, mac_address=00-04-...
    r"(?i)[?&](?:mac|mac_?addr(?:ess)?|device_?mac)=([0-9a-f]{2}(?:[:\-.]?[0-9a-f]{2}){5})(?:&|$)",
    # a file named by MAC, with the usual vendor prefixes (Panasonic's Config<MAC>.cfg) and
    # suffixes, or a folder per device (/<mac>/phone.xml)
    (
        r"(?i)/(?:cfg|config|spa|sep|snom[0-9a-z]*-|yealink-|gs_|aastra-|mitel-)?([0-9a-f]{12})"
        r"(?:[-_.][\w.\-]*)?(?:/|\?|$)"
    ),
    # a path segment or file name that is a MAC written with separators
    # (00:11:22:aa:bb:cc.cfg, 00-11-22-AA-BB-CC-phone.cfg, /00:11:22:aa:bb:cc/)
    (
        r"(?i)/([0-9a-f]{2}([:\-])[0-9a-f]{2}(?:\2[0-9a-f]{2}){4})"
        r"(?:[_.][\w.\-]*|-[a-z_][\w.\-]*)?(?:/|\?|$)"
    ),
)


def compile_patterns(patterns: Iterable[str]) -> tuple[re.Pattern[str], ...]:
    out = []
    for p in patterns:
        try:
            rx = re.compile(p)
        except re.error as exc:
            raise CpeError(f"cpe pattern {p!r}: {exc}") from None
        if rx.groups < 1:
            raise CpeError(f"cpe pattern {p!r}: needs a group around the MAC")
        out.append(rx)
    return tuple(out)


DEFAULT_COMPILED: Final = compile_patterns(DEFAULT_PATTERNS)


def normalise_mac(text: str) -> str | None:
    v = _SEPARATORS.sub("", text).lower()
    return v if _HEX12.match(v) else None


#: a MAC in a User-Agent: written with colons or dashes, else 12 hex digits standing alone
#: (Yealink "... 00:15:65:aa:bb:cc", Cisco "(00112233AABB)", Grandstream "DevId 000b82aabbcc")
_UA_MACS: Final = (
    re.compile(
        r"(?i)(?<![0-9a-f:\-])([0-9a-f]{2}([:\-])[0-9a-f]{2}(?:\2[0-9a-f]{2}){4})(?![0-9a-f:\-])"
    ),
    re.compile(r"(?i)(?<![0-9a-z])([0-9a-f]{12})(?![0-9a-z])"),
)


def mac_in_user_agent(user_agent: str) -> str | None:
    """The MAC a device names in its User-Agent (phones fetching a common file such as
    ``y000000000028.cfg`` or ``000000000000.cfg`` name themselves only there), or None."""
    text = user_agent[:1024]
    for rx in _UA_MACS:
        m = rx.search(text)
        if m:
            return normalise_mac(m.group(1))
    return None


def mac_in_target(target: str, patterns: tuple[re.Pattern[str], ...]) -> str | None:
    """The MAC named by a request target (path and query), or None."""
    if len(target) > 8192:
        target = target[:8192]
    try:
        text = unquote(target, errors="replace")
    except (ValueError, TypeError):
        text = target
    for rx in patterns:
        m = rx.search(text)
        if m:
            mac = normalise_mac(m.group(1))
            if mac:
                return mac
    return None


# --- TR-069 / CWMP -------------------------------------------------------------------------

_TAG: Final = r"(?:[A-Za-z_][\w.\-]*:)?"
_INFORM: Final = re.compile(rb"<" + _TAG.encode() + rb"Inform[\s>/]")
_DEVICE_ID: Final = re.compile(
    rb"<"
    + _TAG.encode()
    + rb"DeviceId\b[^>]{0,512}>(.{0,4096}?)</"
    + _TAG.encode()
    + rb"DeviceId\s*>",
    re.DOTALL,
)
_FIELD: Final = {
    name: re.compile(rb"<" + _TAG.encode() + name.encode() + rb"\b[^>]{0,256}>([^<]{0,256})<")
    for name in ("SerialNumber", "OUI", "ProductClass", "Manufacturer")
}
_MAC_PARAM: Final = re.compile(
    rb"<"
    + _TAG.encode()
    + rb"Name\b[^>]{0,256}>[^<]{0,256}MACAddress\s*</"
    + _TAG.encode()
    + rb"Name\s*>\s*<"
    + _TAG.encode()
    + rb"Value\b[^>]{0,256}>([^<]{0,64})<",
)


def is_inform(body: bytes) -> bool:
    return bool(body) and _INFORM.search(body) is not None


def inform_device(body: bytes) -> dict[str, str]:
    """The DeviceId fields of a CWMP Inform (empty when the body holds none)."""
    m = _DEVICE_ID.search(body)
    if not m:
        return {}
    inner = m.group(1)
    out: dict[str, str] = {}
    for name, rx in _FIELD.items():
        f = rx.search(inner)
        if f:
            out[name] = f.group(1).decode("utf-8", "replace").strip()
    return out


def inform_macs(body: bytes) -> list[str]:
    """Candidate MACs of the device sending an Inform, best first.

    The SerialNumber when it is a MAC (most gateways), then any ``...MACAddress``
    parameter the Inform carries.  Vendors whose serial is not the MAC are provisioned
    by adding the serial's MAC parameter to the Inform's ParameterList (ACS-side)."""
    macs: list[str] = []
    dev = inform_device(body)
    serial = dev.get("SerialNumber", "")
    mac = normalise_mac(serial) if serial else None
    if mac:
        macs.append(mac)
    for pm in _MAC_PARAM.finditer(body[:65536]):
        mac = normalise_mac(pm.group(1).decode("ascii", "replace"))
        if mac and mac not in macs:
            macs.append(mac)
        if len(macs) >= 4:
            break
    return macs


# --- requests -------------------------------------------------------------------------------


# Enum members looked up once: ``RealmKind.CPE`` is a class attribute lookup (~80 ns),
# a Final is a C static in the compiled module.
_CUSTOMER: Final = RealmKind.CUSTOMER
_ADMIN: Final = RealmKind.ADMIN
_CPE: Final = RealmKind.CPE
_FOLLOW: Final = Action.FOLLOW


def realm_kind(realm: str) -> RealmKind:
    if realm in CUSTOMER_REALMS:
        return _CUSTOMER
    if realm in CPE_REALMS:
        return _CPE
    return _ADMIN


#: the fields that name a DID, best first
DID_FIELDS: Final = ("number", "did_number", "did", "phone_number")
# Fields naming an owner, in priority order: (field, identity kind, services or None=any).
ENTITY_FIELDS: Final[tuple[tuple[str, str, frozenset[str] | None], ...]] = (
    ("i_customer", "customer", None),
    ("i_account", "i_account", None),
    ("i_master_account", "i_account", None),  # an alias's account
    ("i_did_number", "i_did_number", None),
    ("id", "account", frozenset({"Account"})),
    ("login", "login", frozenset({"Account", "Customer"})),
    *((field, "did", None) for field in DID_FIELDS),
)
# A create names its parent only: its own id / login are what it creates.
CREATE_OWNER_FIELDS: Final[tuple[tuple[str, str, frozenset[str] | None], ...]] = (
    ("i_customer", "customer", None),
    ("i_parent", "customer", frozenset({"Customer"})),
    ("i_account", "i_account", None),
    ("i_master_account", "i_account", None),  # Account/add_alias
)
LOGIN_FIELDS: Final = ("login", "pb_auth_user", "username", "user")
PASSWORD_FIELDS: Final = ("password", "pb_auth_password", "passwd", "pass")
_LIST_METHOD: Final = re.compile(r"^get_([a-z0-9_]+?)_list$")
_CREATE_METHOD: Final = re.compile(r"^(?:add|create)_[a-z0-9_]+$")
_FORM_TYPES: Final = ("application/x-www-form-urlencoded", "")


def _scalar(v: Any) -> str | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str) and 0 < len(v) <= 256:
        return v
    return None


def _applies(services: frozenset[str] | None, service: str, prefix: str) -> bool:
    """``id`` names an account in the Account service or inside an ``account_info``."""
    if services is None:
        return True
    if not prefix:
        return service in services
    return any(prefix.startswith(s.lower() + "_") for s in services)


def entity_keys(
    service: str, params: dict[str, Any], fields: tuple[tuple[str, str, frozenset[str] | None], ...]
) -> tuple[RouteKey, ...]:
    """Owner candidates among params and their ``*_info`` members, top level first."""
    scopes: list[tuple[str, dict[str, Any]]] = [("", params)]
    for name, v in params.items():
        if isinstance(v, dict) and name.endswith("_info"):
            scopes.append((name + ".", v))
    out: list[RouteKey] = []
    for prefix, scope in scopes:
        for field, kind, services in fields:
            if not _applies(services, service, prefix):
                continue
            v = _scalar(scope.get(field))
            if v is not None:
                out.append(RouteKey(kind, v, prefix + field))
    return tuple(out[:8])


def did_keys(
    headers: Mapping[str, str], body: bytes | None, query: str
) -> tuple[RouteKey, ...]:
    """The DIDs a number-porting request names outside the API params: in a JSON or form
    body's top-level fields, then in the query string.  A porting front end may send
    the number as a plain field (``number=...``, ``?did=...``) to a page that is no API
    call, and an API client may put it beside ``params`` rather than inside; the owner
    of the first one the store knows gets the request (``Forwarder.owner_of``)."""
    out: list[RouteKey] = []
    for where, fields in top_fields(headers, body, query):
        for field in DID_FIELDS:
            v = _scalar(fields.get(field))
            if v is not None:
                out.append(RouteKey("did", v, f"{where}.{field}"))
    return tuple(out[:8])


def _credentials(call: ApiCall | None, cookies: dict[str, str]) -> Credentials:
    sid = tok = ref = login = ""
    secret = bearer = False
    if call is not None:
        ai = call.auth_info
        if ai:  # (none or empty: nothing to read, the usual bearer call)
            sid = _scalar(ai.get("session_id")) or ""
            tok = _scalar(ai.get("access_token")) or ""
            login = _scalar(ai.get("login")) or ""
            secret = bool(_scalar(ai.get("password")) or _scalar(ai.get("token")))
        if not tok and call.bearer:
            tok, bearer = call.bearer[:4096], True
        if call.service == "Session":
            p = call.params
            sid = sid or _scalar(p.get("session_id")) or ""
            tok = tok or _scalar(p.get("access_token")) or ""
            ref = _scalar(p.get("refresh_token")) or ""
    if not sid and not tok:
        sid = cookies.get("session_id", "")[:256]
        tok = cookies.get("access_token", "")[:4096]
    return Credentials(sid, tok, ref, login, secret, bearer)


def _login_keys(realm: str, login: str, where: str) -> tuple[RouteKey, ...]:
    """Owner candidates of a login: the ``login`` identity, and in the account realm the
    account id too (account self-care logs in by account id unless a login was set)."""
    if realm == "account":
        return (RouteKey("login", login, where), RouteKey("account", login, where))
    return (RouteKey("login", login, where),)


#: words in the path of a self-care login form ("/login", "/signin", "/auth/...")
_LOGIN_PATH_WORDS: Final = ("login", "signin", "sign_in", "auth")
#: words in the path of a self-care logout page ("/logout", "/signout", ...)
_LOGOUT_PATH_WORDS: Final = ("logout", "log_out", "logoff", "signout", "sign_out")


def _is_login_form(fields: Mapping[str, str], path: str, signed_in: bool) -> bool:
    """Whether a form holding a user name and a password is a login.  PortaBilling's own
    ``pb_auth_user`` always is.  The generic names (``login``, ``username``, ``user``) are a
    login too, unless the browser is signed in already (a session or authorized-by-remote
    cookie) and the form is not posted to a login path: then it is a form of the signed-in
    customer (add a SIP user, change a password), which must run once, on the browser's
    system, not be tried on the target and then again on the source."""
    if fields.get("pb_auth_user") or not signed_in:
        return True
    low = path.lower()
    return any(w in low for w in _LOGIN_PATH_WORDS)


def needs_body(realm: str, method: str, target: str, headers: Mapping[str, str]) -> bool:
    """Whether routing must read (a bounded prefix of) the request body."""
    if method in ("GET", "HEAD", "OPTIONS", "DELETE"):
        return False
    path = target.partition("?")[0]
    if api_path(path) is not None:
        return True
    if realm in CPE_REALMS:
        return method == "POST"
    if realm in CUSTOMER_REALMS and method == "POST":
        return content_type(headers)[0] in _FORM_TYPES
    if realm == "porting":  # the DID may be a field of the body (did_keys)
        mtype = content_type(headers)[0]
        return mtype in _FORM_TYPES or mtype == "application/json"
    return False


def classify(
    realm: str,
    method: str,
    target: str,
    headers: Mapping[str, str],
    body: bytes | None,
    *,
    cpe_patterns: tuple[re.Pattern[str], ...] = (),
    remote_cookie: str = REMOTE_COOKIE,
    complete: bool = True,
) -> Classified:
    """Classify one request (see the module docstring).  Raises BadRequest only.

    ``body`` is what the server read; ``complete`` False when it is only a prefix of a
    larger body (a multipart upload)."""
    if realm not in REALMS:
        raise BadRequest(f"unknown realm {realm!r}")
    if not target.startswith("/"):
        raise BadRequest("the request target must be an absolute path")
    kind = realm_kind(realm)
    path, _, query = target.partition("?")
    cookies = parse_cookies(headers.get("cookie", "")) if "cookie" in headers else {}
    out = Classified(
        realm=realm,
        kind=kind,
        action=_FOLLOW,
        cookies=cookies,
        remote=cookies.get(remote_cookie, "") not in ("", "0"),
    )

    if kind is _CPE:
        # an operator's patterns come on top of the built-in ones (deploy/dsbc.example.toml)
        patterns = cpe_patterns + DEFAULT_COMPILED if cpe_patterns else DEFAULT_COMPILED
    else:
        patterns = cpe_patterns
    if patterns:
        mac = mac_in_target(target, patterns)
        if mac:
            out.action, out.keys = Action.ENTITY, (RouteKey("cpe", mac, "target"),)
            if kind is _CPE and method in ("GET", "HEAD"):
                # a file named by no device it knows (000000000000.cfg): the User-Agent's
                ua = mac_in_user_agent(headers.get("user-agent", ""))
                if ua and ua != mac:
                    out.keys = (out.keys[0], RouteKey("cpe", ua, "user-agent"))
            return out
    if kind is _CPE:
        if body and is_inform(body):
            macs = inform_macs(body)
            if macs:
                out.action = Action.ENTITY
                out.keys = tuple(RouteKey("cpe", m, "Inform.DeviceId") for m in macs)
        elif method in ("GET", "HEAD"):
            # a common file (y000000000028.cfg, a firmware): the device names itself in its
            # User-Agent.  Not for POSTs: a CWMP session's empty POSTs follow the ACS's
            # cookie, which must win over the device's owner during its migration.
            ua = mac_in_user_agent(headers.get("user-agent", ""))
            if ua:
                out.action, out.keys = Action.ENTITY, (RouteKey("cpe", ua, "user-agent"),)
        return out

    sm = api_path(path)
    if sm is None:
        if (
            kind is _CUSTOMER
            and method == "POST"
            and body
            and complete
            and content_type(headers)[0] in _FORM_TYPES
        ):
            try:
                fields = form_fields(body)
            except BadRequest:  # any other form (legacy charset, many fields): not a login
                fields = {}
            user = next((fields[f] for f in LOGIN_FIELDS if fields.get(f)), "")
            if user and any(fields.get(f) for f in PASSWORD_FIELDS) and _is_login_form(
                fields, path, out.remote or "session_id" in cookies or "access_token" in cookies
            ):
                out.action = Action.WEB_LOGIN
                out.keys = _login_keys(realm, user[:256], "form")
                out.creds = Credentials(login=user[:256], secret=True)
                return out
        out.creds = _credentials(None, cookies)
        if out.remote and kind is _CUSTOMER:
            low = path.lower()
            if any(w in low for w in _LOGOUT_PATH_WORDS):
                # its flow expires the authorized-by-remote cookie with the session
                out.action = Action.LOGOUT
            return out
        if realm == "porting":
            out.keys = did_keys(headers, body if complete else None, query)
            if out.keys:
                out.action = Action.ENTITY
        return out

    service, api_method = sm
    call = parse_call(service, api_method, headers, body, query, complete)
    out.call = call
    out.creds = creds = _credentials(call, cookies)

    if service == "Session":
        params = call.params
        if api_method == "login":
            out.action = Action.LOGIN
            login = _scalar(params.get("login")) or _scalar((call.auth_info or {}).get("login"))
            if login:
                out.keys = _login_keys(realm, login, "login")
            return out
        if api_method == "logout":
            out.action = Action.LOGOUT
        elif api_method == "refresh_access_token":
            out.action = Action.REFRESH
        elif api_method == "set_session_context":
            system = _scalar(params.get("system")) or _scalar(params.get("dsbc_system")) or ""
            if system in SYSTEMS:
                out.action, out.context = Action.SET_CONTEXT, system
        return out

    if kind is _CUSTOMER:
        if not (creds.session_id or creds.access_token or creds.refresh_token) and creds.login:
            out.keys = _login_keys(realm, creds.login, "auth_info.login")
        # a customer adding an account (a DID, ...) in its own session: recorded as an admin's
        out.creates = _CREATE_METHOD.match(api_method) is not None
        return out

    # admin realms: an owner wins over merging and over the create rules
    params = call.params  # (a Struct attribute: read where it is used)
    lm = _LIST_METHOD.match(api_method)
    if _CREATE_METHOD.match(api_method):
        out.creates = True
        out.keys = entity_keys(service, params, CREATE_OWNER_FIELDS)
        out.action = Action.ENTITY if out.keys else Action.CREATE
        return out
    out.keys = entity_keys(service, params, ENTITY_FIELDS)
    if realm == "porting":
        out.keys = (out.keys + did_keys(headers, body if complete else None, query))[:8]
    if lm:  # list filters may be patterns ("id": "1000%"): those name no entity
        out.keys = tuple(k for k in out.keys if not any(ch in k.value for ch in "%*?"))
    if out.keys:
        out.action = Action.ENTITY
    elif lm:
        out.action, out.list_key = Action.LIST, lm.group(1) + "_list"
    return out
