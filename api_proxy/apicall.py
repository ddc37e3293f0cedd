"""The billing API's request formats: read what routing needs, rewrite only when asked.

A JSON API call is ``POST /rest/<Service>/<method>`` whose ``auth_info`` and ``params``
(JSON objects) come as form fields (``application/x-www-form-urlencoded`` or
``multipart/form-data``), as members of a JSON body, or in the query string; a
``Authorization: Bearer <access_token>`` header may stand for ``auth_info``.

Pure: bytes in, values out, no I/O.  Anything malformed raises ``BadRequest``.  A body
that is not rewritten is forwarded byte-exact; ``encode`` is used only when the
dispatcher must change the credentials or the list window of a call.

Compiled with mypyc like ``classify``: ``ApiCall`` and ``BodyFormat`` live in
``calltypes`` (re-exported here).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode

import msgspec

from api_proxy.calltypes import ApiCall, BodyFormat
from api_proxy.errors import BadRequest

__all__ = [
    "MAX_FORM_FIELDS",
    "ApiCall",
    "BodyFormat",
    "api_path",
    "content_type",
    "encode",
    "form_fields",
    "media_type",
    "multipart_fields",
    "parse_call",
    "parse_cookies",
    "top_fields",
]

MAX_FORM_FIELDS: Final = 256


_REST_PATH: Final = re.compile(
    r"(?:^|/)rest/([A-Za-z][A-Za-z0-9_]{0,63})/([A-Za-z][A-Za-z0-9_]{0,127})/?$"
)


#: api_path's answers for the paths seen (a handful in practice); ("", "") for none
_API_PATHS: Final[dict[str, tuple[str, str]]] = {}
_API_PATHS_SIZE: Final = 1024
_API_PATH_LEN: Final = 256


def api_path(path: str) -> tuple[str, str] | None:
    """``/rest/Customer/get_customer_info`` -> ``("Customer", "get_customer_info")``.

    Perf note: every request asks twice (``needs_body``, ``classify``) and clients call
    the same few methods, so the answer is kept for short paths (emptied when full)
    instead of running the regex search (~2 us) each time."""
    found = _API_PATHS.get(path)
    if found is None:
        m = _REST_PATH.search(path)
        found = (m.group(1), m.group(2)) if m else ("", "")
        if len(path) <= _API_PATH_LEN:
            if len(_API_PATHS) >= _API_PATHS_SIZE:
                _API_PATHS.clear()
            _API_PATHS[path] = found
    return found if found[0] else None


# enum members looked up once (a Final is a C static in the compiled module)
_NONE: Final = BodyFormat.NONE
_JSON: Final = BodyFormat.JSON
_FORM: Final = BodyFormat.FORM
_MULTIPART: Final = BodyFormat.MULTIPART
_QUERY: Final = BodyFormat.QUERY


def _get(headers: Mapping[str, str], name: str) -> str:
    """``headers.get(name, "")``: for the fast path's dict, without a Python-level method
    call."""
    if isinstance(headers, dict):
        d: dict[str, str] = headers
        return d.get(name, "")
    return headers.get(name, "")


#: looked up once (each ``msgspec.json.decode`` is two attribute lookups)
_json_decode: Final = msgspec.json.decode


#: media_type's answers for the Content-Type values seen (a handful in practice)
_MEDIA_TYPES: Final[dict[str, str]] = {}
_MEDIA_TYPES_SIZE: Final = 256
_MEDIA_TYPE_LEN: Final = 256


def media_type(headers: Mapping[str, str]) -> str:
    """``content_type(headers)[0]``, kept for short values (emptied when full): no split,
    strip, lower or parameter dict for the few values clients send."""
    raw = _get(headers, "content-type")
    mtype = _MEDIA_TYPES.get(raw)
    if mtype is None:
        mtype = raw.partition(";")[0].strip().lower()
        if len(raw) <= _MEDIA_TYPE_LEN:
            if len(_MEDIA_TYPES) >= _MEDIA_TYPES_SIZE:
                _MEDIA_TYPES.clear()
            _MEDIA_TYPES[raw] = mtype
    return mtype


def content_type(headers: Mapping[str, str]) -> tuple[str, dict[str, str]]:
    """The media type (lowercased) and its parameters."""
    raw = _get(headers, "content-type")
    parts = raw.split(";")
    mtype = parts[0].strip().lower()
    params: dict[str, str] = {}
    for p in parts[1:]:
        k, sep, v = p.partition("=")
        if sep:
            params[k.strip().lower()] = v.strip().strip('"')
    return mtype, params


def _json_object(value: Any, field: str) -> dict[str, Any]:
    """A field given as a JSON object or as JSON text holding one."""
    if isinstance(value, (bytes, str)):
        if not value or (isinstance(value, str) and not value.strip()):
            return {}
        try:
            value = msgspec.json.decode(value)
        except (msgspec.DecodeError, RecursionError):  # (nesting deeper than msgspec takes)
            raise BadRequest(f"{field} is not valid JSON") from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"{field} must be a JSON object")
    return value


def _form_pairs(text: str) -> list[tuple[str, str]]:
    try:
        return parse_qsl(text, keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS)
    except ValueError as exc:
        raise BadRequest(f"form body: {exc}") from None


def _decode_text(body: bytes, what: str) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(f"{what} is not UTF-8") from None


def multipart_fields(
    body: bytes, boundary: str, wanted: tuple[str, ...], complete: bool = True
) -> dict[str, tuple[int, int]]:
    """Spans of the wanted fields' values among the complete parts of a multipart body.

    Only parts wholly inside ``body`` are returned, so a body prefix (a large upload
    whose first bytes were buffered, ``complete=False``) works: the small fields come
    first in practice.  A complete body must be well framed (first and closing
    delimiters)."""
    if not boundary or len(boundary) > 200:
        raise BadRequest("multipart body without a usable boundary")
    delim = b"--" + boundary.encode("latin-1", "replace")
    if complete and (not body.lstrip(b"\r\n").startswith(delim) or delim + b"--" not in body):
        raise BadRequest("the multipart body is not well framed")
    spans: dict[str, tuple[int, int]] = {}
    pos = body.find(delim)
    while pos >= 0 and len(spans) < len(wanted):
        head_start = pos + len(delim)
        if body[head_start : head_start + 2] == b"--":
            break
        head_end = body.find(b"\r\n\r\n", head_start)
        if head_end < 0:
            break
        nxt = body.find(b"\r\n" + delim, head_end + 4)
        if nxt < 0:
            break
        headers = body[head_start:head_end].decode("latin-1").lower()
        m = re.search(r'content-disposition:[^\r\n]*?\bname="?([^";\r\n]+)"?', headers)
        if m and m.group(1) in wanted and m.group(1) not in spans:
            spans[m.group(1)] = (head_end + 4, nxt)
        pos = nxt + 2
    return spans


def parse_call(
    service: str,
    method: str,
    headers: Mapping[str, str],
    body: bytes | None,
    query: str = "",
    complete: bool = True,
) -> ApiCall:
    """Read ``auth_info``, ``params`` and a bearer token from an API request."""
    # the ApiCall is made once, at the end: each attribute set on a Struct is a
    # Python-level call from compiled code
    auth = _get(headers, "authorization")
    # (startswith first: the usual spelling, without making two strings)
    bearer = (
        auth[7:].strip()
        if auth.startswith("Bearer ") or auth[:7].lower() == "bearer "
        else ""
    )
    fmt = _NONE
    spans: dict[str, tuple[int, int]] = {}
    json_strings = False
    raw_auth: Any = None
    raw_params: Any = None
    if body:
        mtype = media_type(headers)
        if mtype == "application/json" or (not mtype and body.lstrip()[:1] == b"{"):
            fmt = _JSON
            try:
                doc = _json_decode(body)
            except (msgspec.DecodeError, RecursionError):  # (nesting deeper than msgspec takes)
                raise BadRequest("the JSON body is not valid JSON") from None
            if not isinstance(doc, dict):
                raise BadRequest("the JSON body must be an object")
            raw_auth, raw_params = doc.get("auth_info"), doc.get("params")
            json_strings = isinstance(raw_auth, str) or isinstance(raw_params, str)
        elif mtype == "multipart/form-data":
            fmt = _MULTIPART
            ctparams = content_type(headers)[1]
            spans = multipart_fields(
                body, ctparams.get("boundary", ""), ("auth_info", "params"), complete
            )
            if "auth_info" in spans:
                a, b = spans["auth_info"]
                raw_auth = body[a:b]
            if "params" in spans:
                a, b = spans["params"]
                raw_params = body[a:b]
        else:
            fmt = _FORM
            fields = dict(_form_pairs(_decode_text(body, "the form body")))
            raw_auth, raw_params = fields.get("auth_info"), fields.get("params")
    if raw_auth is None and raw_params is None and query:
        fields = dict(_form_pairs(query))
        if "auth_info" in fields or "params" in fields:
            fmt = _QUERY
            raw_auth, raw_params = fields.get("auth_info"), fields.get("params")
    auth_info = _json_object(raw_auth, "auth_info") if raw_auth is not None else None
    return ApiCall(
        service=service,
        method=method,
        fmt=fmt,
        auth_info=auth_info,
        params=_json_object(raw_params, "params"),
        bearer=bearer,
        spans=spans,
        json_strings=json_strings,
    )


_enc: Final = msgspec.json.Encoder()


def encode(
    call: ApiCall,
    body: bytes | None,
    query: str,
    auth_info: dict[str, Any] | None = None,
    params: dict[str, Any] | None = None,
) -> tuple[bytes | None, str]:
    """The (body, query) of ``call`` with ``auth_info`` and/or ``params`` replaced.

    Other fields and members are kept; when nothing is replaced the input comes back
    unchanged (byte-exact pass-through)."""
    new: dict[str, bytes] = {}
    if auth_info is not None:
        new["auth_info"] = _enc.encode(auth_info)
    if params is not None:
        new["params"] = _enc.encode(params)
    if not new:
        return body, query
    fmt = call.fmt
    if fmt is BodyFormat.NONE:
        fmt = BodyFormat.FORM if body is None else call.fmt
        if body is None:
            return _encode_form(b"", new), query
    if fmt is BodyFormat.QUERY:
        return body, _encode_form(query.encode(), new).decode()
    if fmt is BodyFormat.FORM:
        return _encode_form(body or b"", new), query
    if fmt is BodyFormat.JSON:
        doc = msgspec.json.decode(body or b"{}", type=dict[str, msgspec.Raw])
        for k, v in new.items():
            doc[k] = msgspec.Raw(_enc.encode(v.decode()) if call.json_strings else v)
        return _enc.encode(doc), query
    # multipart: splice the new values into their parts (no lengths inside parts)
    assert body is not None
    out = bytearray(body)
    for k, (a, b) in sorted(call.spans.items(), key=lambda kv: -kv[1][0]):
        if k in new:
            out[a:b] = new[k]
    missing = [k for k in new if k not in call.spans]
    if missing:
        raise BadRequest(f"multipart body has no {', '.join(missing)} part to rewrite")
    return bytes(out), query


def _encode_form(body: bytes, new: dict[str, bytes]) -> bytes:
    pairs = _form_pairs(_decode_text(body, "the form body")) if body else []
    seen = set()
    out: list[tuple[str, str]] = []
    for k, v in pairs:
        if k in new:
            if k in seen:
                continue
            seen.add(k)
            v = new[k].decode()
        out.append((k, v))
    for k, v2 in new.items():
        if k not in seen:
            out.append((k, v2.decode()))
    return urlencode(out).encode()


def parse_cookies(header: str, limit: int = 32) -> dict[str, str]:
    """A Cookie header as a dict (first wins); tolerant, bounded."""
    out: dict[str, str] = {}
    for part in header.split(";")[:limit]:
        name, sep, value = part.strip().partition("=")
        if sep and name and name not in out:
            out[name] = value.strip().strip('"')
    return out


def top_fields(
    headers: Mapping[str, str], body: bytes | None, query: str
) -> list[tuple[str, dict[str, Any]]]:
    """("body", fields) and ("query", fields): the top-level fields a request carries
    beside ``auth_info`` and ``params``, a JSON object body's members or a form body's
    fields, then the query string's parameters.

    Tolerant: what cannot be read gives nothing.  Routing by these fields is a
    convenience (a number-porting request naming its DID outside the API params), and an
    API call's own format errors are ``parse_call``'s to report."""
    out: list[tuple[str, dict[str, Any]]] = []
    if body:
        mtype = media_type(headers)
        try:
            if mtype == "application/json" or (not mtype and body.lstrip()[:1] == b"{"):
                doc = _json_decode(body)
                if isinstance(doc, dict):
                    out.append(("body", doc))
            elif mtype == "application/x-www-form-urlencoded" or not mtype:
                out.append(("body", form_fields(body)))
        except (BadRequest, msgspec.DecodeError, RecursionError):
            pass
    if query:
        try:
            out.append(("query", _first_values(_form_pairs(query))))
        except BadRequest:
            pass
    return out


def form_fields(body: bytes) -> dict[str, str]:
    """A urlencoded web form (first value of each field)."""
    return _first_values(_form_pairs(_decode_text(body, "the form body")))


def _first_values(pairs: list[tuple[str, str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in pairs:
        out.setdefault(k, v)
    return out
