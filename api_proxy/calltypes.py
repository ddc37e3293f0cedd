"""The values the classifier works with: an API call, its credentials, the verdict.

``apicall`` reads a billing API call into an ``ApiCall``; ``classify`` turns a request
into a ``Classified`` (the action, the candidate owners ``RouteKey``, the
``Credentials``).  Both of those modules are compiled with mypyc (``sip/_pure.py``); the
msgspec Structs, enums and exceptions they produce live here, interpreted, because
mypyc drops msgspec's class keywords (``frozen=True``, ``kw_only=True``), rejects
``msgspec.field`` defaults and compiles exception classes to fixed C structs.
``apicall`` and ``classify`` re-export every name, so callers import them from there.
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec


class CpeError(ValueError):
    """A configured CPE pattern that cannot be used (local misuse: raised at start)."""


class BodyFormat(enum.StrEnum):
    FORM = "form"
    JSON = "json"
    MULTIPART = "multipart"
    QUERY = "query"
    NONE = "none"


class ApiCall(msgspec.Struct, kw_only=True):
    """One billing API call as far as routing needs it."""

    service: str
    method: str
    fmt: BodyFormat = BodyFormat.NONE
    auth_info: dict[str, Any] | None = None
    params: dict[str, Any] = msgspec.field(default_factory=dict)
    bearer: str = ""
    #: multipart only: (start, end) of each field's value in the body
    spans: dict[str, tuple[int, int]] = msgspec.field(default_factory=dict)
    #: json only: auth_info / params were JSON text inside JSON strings
    json_strings: bool = False

    @property
    def name(self) -> str:
        return f"{self.service}/{self.method}"


class RealmKind(enum.StrEnum):
    CUSTOMER = "customer"
    ADMIN = "admin"
    CPE = "cpe"


class Action(enum.StrEnum):
    LOGIN = "login"  # Session/login
    WEB_LOGIN = "web_login"  # a self-care login form
    LOGOUT = "logout"
    REFRESH = "refresh"  # Session/refresh_access_token
    SET_CONTEXT = "set_context"  # Session/set_session_context naming a system
    LIST = "list"  # get_*_list without an owner (admin realms): merged
    CREATE = "create"  # add_* without an owner (admin realms)
    ENTITY = "entity"  # owned by the first resolvable key
    FOLLOW = "follow"  # the session / cookie / default system


class RouteKey(msgspec.Struct, frozen=True):
    """A candidate owner: an identity ``kind`` (or ``customer`` for an i_customer)."""

    kind: str
    value: str
    field: str = ""


class Credentials(msgspec.Struct, frozen=True):
    session_id: str = ""
    access_token: str = ""
    refresh_token: str = ""
    login: str = ""
    secret: bool = False  # a password or API token came with the login
    bearer: bool = False  # the access token came in an Authorization header


class Classified(msgspec.Struct, kw_only=True):
    realm: str
    kind: RealmKind
    action: Action
    keys: tuple[RouteKey, ...] = ()
    call: ApiCall | None = None
    creds: Credentials = Credentials()
    cookies: dict[str, str] = msgspec.field(default_factory=dict)
    remote: bool = False  # the browser carries the authorized-by-remote cookie
    creates: bool = False  # record what the call creates
    list_key: str = ""
    context: str = ""  # SET_CONTEXT: the system named
