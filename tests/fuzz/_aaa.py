"""The invariants of the RADIUS, Diameter and API-classifier harnesses (the SIP ones are in
``_common.py``, whose runner they share: atheris when installed, else a bounded mutation
loop over the harness's own seed corpus).

* RADIUS (``dsbc.radius.packet`` + ``dsbc.radius.core``): any octets decode to a
  ``Packet`` or raise ``RadiusDecodeError``; a decoded packet encodes back to the same
  octets; every helper on it (VSAs, hidden attributes, authenticators, re-encryption)
  returns or raises ``RadiusDecodeError``; the dispatcher core fed the octets as they
  are, and re-signed with the client's secret (so that fuzzing reaches routing,
  re-signing and the answer path), never raises: bad input is a counted drop.
* Diameter (``dsbc.diameter.codec`` + ``dsbc.diameter.routing``): any octets decode to a
  ``Message`` or raise ``DiameterDecodeError``; decode(encode(m)) == m; grouped AVPs,
  Unsigned32 values, Subscription-Ids, advertised applications and answers keep that
  promise; the ``Framer`` cuts any stream into messages or raises it, the same whole or
  byte by byte; the router takes any decoded request or answer and raises nothing but
  ``DiameterDecodeError`` (which the service answers).
* API classifier (``api_proxy.classify``): any (realm, method, target, headers, body)
  classifies or raises ``BadRequest``.
"""

from __future__ import annotations

import itertools
import json
import pathlib
import zlib
from typing import Any

from api_proxy.classify import REALMS, classify, needs_body
from api_proxy.errors import BadRequest
from dsbc.diameter import codec as dc
from dsbc.diameter.routing import TO_PEER, DiameterRouter, SystemRoute
from dsbc.radius import packet as rp
from dsbc.radius.core import ACCT, AUTH, TO_SERVER, RadiusCore, SystemTarget

HERE = pathlib.Path(__file__).resolve().parent
NAS = ("10.0.0.1", 40000)
NAS_SECRET = b"nas-secret"
SECRETS = {"source": b"src-secret", "target": b"tgt-secret"}


# --- RADIUS ----------------------------------------------------------------------------------


def _decide(user: str) -> tuple[str, str]:
    # every routing outcome, chosen by the user name so the fuzzer can steer it
    h = zlib.crc32(user.encode("utf-8", "surrogateescape")) % 4
    return (("source", "active"), ("target", "active"), ("reject", "active"), ("target", "locked"))[
        h
    ]


def _radius_core() -> RadiusCore:
    systems = [
        SystemTarget("source", "src-secret", [("127.0.0.1", 1812)], [("127.0.0.1", 1813)]),
        SystemTarget("target", "tgt-secret", [("127.0.0.2", 1812)], []),
    ]
    return RadiusCore([("10.0.0.0/24", NAS_SECRET.decode())], systems, _decide, lock_hold=0.5)


def check_radius_packet(data: bytes) -> rp.Packet | None:
    try:
        pkt = rp.decode(data)
    except rp.RadiusDecodeError:
        return None
    length = (data[2] << 8) | data[3]
    assert rp.encode(pkt) == data[:length], "decode/encode is not byte exact"
    for t, v in pkt.attrs:
        pkt.get_text(t)
        pkt.get_int(t)
        if t == rp.VENDOR_SPECIFIC:
            vsa = rp.split_vsa(v)
            if vsa is not None:
                assert rp.join_vsa(*vsa) == v
    for call in (
        lambda: rp.unhide_password(pkt.get(rp.USER_PASSWORD) or b"", NAS_SECRET, pkt.authenticator),
        lambda: rp.verify_message_authenticator(data[:length], NAS_SECRET),
        lambda: rp.verify_response(data[:length], pkt.authenticator, NAS_SECRET),
        lambda: rp.reencrypt_answer_attrs(
            rp.decode(data), NAS_SECRET, pkt.authenticator, b"other", bytes(16)
        ),
    ):
        try:
            call()
        except rp.RadiusDecodeError:
            pass
    return pkt


def check_radius(data: bytes) -> None:
    pkt = check_radius_packet(data)
    core = _radius_core()
    now = 1000.0
    via = ACCT if pkt is not None and pkt.code == rp.ACCOUNTING_REQUEST else AUTH
    outs = core.handle_request(via, data, NAS, now)  # as received: mostly drops
    if pkt is None:
        return
    try:
        signed = rp.sign_request(pkt, NAS_SECRET)
    except ValueError:
        signed = data  # too big once a Message-Authenticator is filled in
    outs += core.handle_request(via, signed, NAS, now + 0.01)
    outs += core.handle_request(via, signed, NAS, now + 0.02)  # a retransmission
    outs += core.handle_timer(now + 0.6)  # held requests released or refused
    for out in outs:
        if out.kind != TO_SERVER:
            continue
        sent = rp.decode(out.data)
        # the system answers with the fuzzed attributes, signed for the system's secret
        code = rp.ACCOUNTING_RESPONSE if sent.code == rp.ACCOUNTING_REQUEST else rp.ACCESS_ACCEPT
        state = [(t, v) for t, v in sent.attrs if t == rp.PROXY_STATE]
        answer = rp.Packet(code, sent.identifier, bytes(16), [*pkt.attrs[:20], *state])
        try:
            wire = rp.sign_response(answer, sent.authenticator, SECRETS[out.system])
        except ValueError:
            continue
        core.handle_answer(out.system, out.via, wire, out.addr, now + 0.1)
        core.handle_answer(out.system, out.via, data, out.addr, now + 0.1)  # garbage answer
    core.handle_timer(now + 100.0)
    core.status()


# --- Diameter --------------------------------------------------------------------------------


def _walk_groups(avps: list[dc.Avp], depth: int = 0) -> None:
    if depth > 4:
        return
    for a in avps:
        for call in (a.u32, a.text):
            try:
                call()
            except dc.DiameterDecodeError:
                pass
        try:
            _walk_groups(a.group(), depth + 1)
        except dc.DiameterDecodeError:
            pass


def check_diameter_message(data: bytes) -> dc.Message | None:
    try:
        m = dc.decode(data)
    except dc.DiameterDecodeError:
        return None
    again = dc.decode(dc.encode(m))
    assert again == m, "decode(encode(m)) != m"
    _walk_groups(m.avps)
    for call in (lambda: dc.subscription_ids(m), lambda: dc.advertised_apps(m)):
        try:
            call()
        except dc.DiameterDecodeError:
            pass
    if m.is_request:
        dc.decode(
            dc.encode(dc.answer(m, dc.UNABLE_TO_DELIVER, "dsbc", "example.net", error_message="x"))
        )
    return m


def _frames(chunks: list[bytes]) -> tuple[list[bytes], str | None]:
    f = dc.Framer()
    out: list[bytes] = []
    try:
        for c in chunks:
            f.feed(c)
            while (msg := f.next_message()) is not None:
                out.append(msg)
    except dc.DiameterDecodeError as exc:
        return out, f"{exc.result_code}"
    return out, None


def _router() -> DiameterRouter:
    def decide(candidates: list[tuple[str, str]]) -> tuple[str, str]:
        return _decide("|".join(v for _, v in candidates))

    systems = [
        SystemRoute("source", "ocs.mr100", "mr100"),
        SystemRoute("target", "ocs.mr115", "mr115"),
    ]
    r = DiameterRouter(
        systems, decide, "dsbc.example.net", "example.net", request_timeout=1.0, lock_hold=0.5
    )
    r.client_open(1, "nas.example.net")
    r.peer_state("source", True, "ocs.mr100")
    r.peer_state("target", True, "ocs.mr115")
    return r


def check_diameter(data: bytes) -> None:
    m = check_diameter_message(data)
    whole = _frames([data])
    if len(data) <= 600:
        bytewise = _frames([data[i : i + 1] for i in range(len(data))])
        assert bytewise == whole, "byte-by-byte framing differs"
    else:  # longer inputs: a few cuts (byte by byte costs too much per run)
        cuts = sorted({len(data) // 3, len(data) // 2, len(data) - 7, 19, 20, 21})
        bounds = [0, *[c for c in cuts if 0 < c < len(data)], len(data)]
        chunks = [data[a:b] for a, b in itertools.pairwise(bounds)]
        assert _frames(chunks) == whole, "cut framing differs"
    for frame in whole[0]:
        check_diameter_message(frame)
    if m is None:
        return
    r = _router()
    now = 100.0
    try:
        if m.is_request:
            outs = r.client_request(1, m, now)
            outs += r.handle_timer(now + 0.6)
            for s in outs:
                if s.kind != TO_PEER:
                    continue
                # the system answers the forwarded request with the fuzzed AVPs
                fwd = dc.decode(s.data)
                ans = dc.Message(
                    fwd.flags & ~dc.FLAG_R,
                    fwd.code,
                    fwd.app_id,
                    fwd.hop_by_hop,
                    fwd.end_to_end,
                    m.avps,
                )
                r.answer_from(str(s.target), ans, now + 0.1)
            r.peer_request("source", m, now)
        else:
            r.answer_from(1, m, now)
            r.answer_from("source", m, now)
    except dc.DiameterDecodeError:
        pass  # answered by the service (5014 and friends)
    r.handle_timer(now + 100.0)
    r.status()


# --- API classifier ------------------------------------------------------------------------------


def split_api_input(data: bytes) -> tuple[str, str, str, dict[str, str], bytes]:
    """A harness input: a JSON line (realm, method, target, headers), then the body; any
    octets that are not such a line still make a request (the raw octets as the target)."""
    head, _, body = data.partition(b"\n")
    try:
        meta: Any = json.loads(head)
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        realms = sorted(REALMS)
        realm = realms[data[0] % len(realms)] if data else "customer"
        return (
            realm,
            "POST",
            "/" + head.decode("latin-1"),
            {"content-type": "application/json"},
            body,
        )
    headers = meta.get("headers")
    headers = (
        {str(k).lower(): str(v) for k, v in headers.items()} if isinstance(headers, dict) else {}
    )
    return (
        str(meta.get("realm", "")),
        str(meta.get("method", "POST")),
        str(meta.get("target", "/")),
        headers,
        body,
    )


def check_api(data: bytes) -> None:
    realm, method, target, headers, body = split_api_input(data)
    try:
        needs_body(realm, method, target, headers)
    except BadRequest:
        pass
    for complete in (True, False):
        try:
            classify(realm, method, target, headers, body, complete=complete)
        except BadRequest:
            pass
