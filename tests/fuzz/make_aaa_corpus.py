"""Write the seed corpora of the RADIUS, Diameter and API-classifier harnesses.

    python tests/fuzz/make_aaa_corpus.py        # rewrites corpus-radius/, corpus-diameter/, corpus-api/

The seeds are the traffic dsbc sees in the tests and the demo, built with the product's
own encoders (so they are valid and deep paths are reached at once): RADIUS
Access-Request with PAP / CHAP / EAP + Message-Authenticator, Accounting Start / Interim
/ Stop / Accounting-On, Status-Server, answers with MS-MPPE keys and Tunnel-Password;
Diameter CER / CEA / DWR / DPR and CCR-I/U/T with Subscription-Id (E.164, IMSI, SIP
URI), vendor AVPs and Proxy-Info, a stream of three; API requests as the billing API,
the self-care pages and CPEs send them (JSON and form bodies, Bearer tokens, cookies,
multipart, TR-069 Inform).  Deterministic: the same files every run.
"""

from __future__ import annotations

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from dsbc.diameter import codec as dc
from dsbc.radius import packet as rp

HERE = pathlib.Path(__file__).resolve().parent
NAS_SECRET = b"nas-secret"  # the client secret the RADIUS harness uses
AUTH = bytes(range(16))


def radius_seeds() -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    user = (rp.USER_NAME, b"alice")
    nas = (rp.NAS_IP_ADDRESS, bytes((10, 0, 0, 1)))
    pap = rp.Packet(
        rp.ACCESS_REQUEST,
        1,
        AUTH,
        [user, (rp.USER_PASSWORD, rp.hide_password(b"secret", NAS_SECRET, AUTH)), nas],
    )
    out["access-request-pap"] = rp.sign_request(pap, NAS_SECRET)
    pap_ma = rp.Packet(
        rp.ACCESS_REQUEST, 2, AUTH, [(rp.MESSAGE_AUTHENTICATOR, rp.ZERO16), *pap.attrs]
    )
    out["access-request-pap-ma"] = rp.sign_request(pap_ma, NAS_SECRET)
    chap = rp.Packet(
        rp.ACCESS_REQUEST,
        3,
        AUTH,
        [user, (rp.CHAP_PASSWORD, b"\x01" + bytes(16)), (rp.CHAP_CHALLENGE, bytes(16)), nas],
    )
    out["access-request-chap"] = rp.sign_request(chap, NAS_SECRET)
    eap = rp.Packet(
        rp.ACCESS_REQUEST,
        4,
        AUTH,
        [
            (rp.USER_NAME, b"bob@wifi"),
            (rp.EAP_MESSAGE, b"\x02\x01\x00\x0d\x01bob@wifi"),
            (rp.MESSAGE_AUTHENTICATOR, rp.ZERO16),
            (rp.PROXY_STATE, b"nas-state"),
        ],
    )
    out["access-request-eap"] = rp.sign_request(eap, NAS_SECRET)
    for status, name in (
        (rp.ACCT_START, "start"),
        (rp.ACCT_INTERIM, "interim"),
        (rp.ACCT_STOP, "stop"),
    ):
        acct = rp.Packet(
            rp.ACCOUNTING_REQUEST,
            10 + status,
            rp.ZERO16,
            [
                user,
                (rp.ACCT_STATUS_TYPE, status.to_bytes(4, "big")),
                (rp.ACCT_SESSION_ID, b"sess-0001"),
                nas,
            ],
        )
        out[f"accounting-{name}"] = rp.sign_request(acct, NAS_SECRET)
    on = rp.Packet(
        rp.ACCOUNTING_REQUEST,
        20,
        rp.ZERO16,
        [(rp.ACCT_STATUS_TYPE, rp.ACCT_ON.to_bytes(4, "big")), nas],
    )
    out["accounting-on"] = rp.sign_request(on, NAS_SECRET)
    ss = rp.Packet(rp.STATUS_SERVER, 30, AUTH, [(rp.MESSAGE_AUTHENTICATOR, rp.ZERO16)])
    out["status-server"] = rp.sign_request(ss, NAS_SECRET)
    keys = rp.join_vsa(rp.VENDOR_MICROSOFT, [
        (rp.MS_MPPE_SEND_KEY, rp.salt_encrypt(bytes(32), NAS_SECRET, AUTH, b"\x80\x01")),
        (rp.MS_MPPE_RECV_KEY, rp.salt_encrypt(bytes(range(32)), NAS_SECRET, AUTH, b"\x80\x02")),
    ])  # fmt: skip
    accept = rp.Packet(
        rp.ACCESS_ACCEPT,
        4,
        AUTH,
        [
            (rp.VENDOR_SPECIFIC, keys),
            (
                rp.TUNNEL_PASSWORD,
                b"\x01" + rp.salt_encrypt(b"tunnel", NAS_SECRET, AUTH, b"\x80\x03"),
            ),
            (rp.MESSAGE_AUTHENTICATOR, rp.ZERO16),
            (rp.REPLY_MESSAGE, b"welcome"),
        ],
    )
    out["access-accept-keys"] = rp.sign_response(accept, AUTH, NAS_SECRET)
    out["access-reject"] = rp.sign_response(
        rp.Packet(rp.ACCESS_REJECT, 1, AUTH, [(rp.REPLY_MESSAGE, b"no")]), AUTH, NAS_SECRET
    )
    out["accounting-response"] = rp.sign_response(
        rp.Packet(rp.ACCOUNTING_RESPONSE, 11, AUTH, []), AUTH, NAS_SECRET
    )
    big = rp.Packet(rp.ACCESS_REQUEST, 5, AUTH, [user] + [(rp.EAP_MESSAGE, bytes(253))] * 15)
    out["access-request-near-max"] = rp.encode(big)
    return out


def diameter_seeds() -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    caps = dc.capabilities(
        "nas.example.net", "example.net", ["10.0.0.1"], [dc.APP_CREDIT_CONTROL], state_id=7
    )
    out["cer"] = dc.encode(dc.request(dc.CMD_CE, dc.APP_COMMON, 1, 1, caps))
    cea = dc.answer(
        dc.Header(dc.FLAG_R, dc.CMD_CE, 0, 1, 1),
        dc.SUCCESS,
        "dsbc.example.net",
        "example.net",
        caps[2:],
    )
    out["cea"] = dc.encode(cea)
    out["dwr"] = dc.encode(
        dc.request(
            dc.CMD_DW,
            dc.APP_COMMON,
            2,
            2,
            [dc.utf8(dc.ORIGIN_HOST, "nas"), dc.utf8(dc.ORIGIN_REALM, "example.net")],
        )
    )
    out["dpr"] = dc.encode(
        dc.request(
            dc.CMD_DP,
            dc.APP_COMMON,
            3,
            3,
            [
                dc.utf8(dc.ORIGIN_HOST, "nas"),
                dc.utf8(dc.ORIGIN_REALM, "example.net"),
                dc.u32(dc.DISCONNECT_CAUSE, 0),
            ],
        )
    )
    subs = {
        "e164": dc.subscription_id(0, "+15550001001"),
        "imsi": dc.subscription_id(dc.SUB_IMSI, "001010123456789"),
        "sipuri": dc.subscription_id(dc.SUB_SIP_URI, "sip:1001@example.net"),
    }
    for i, (name, sub) in enumerate(subs.items()):
        for cc_type, tname in ((dc.CC_INITIAL, "i"), (dc.CC_UPDATE, "u"), (dc.CC_TERMINATE, "t")):
            avps = [
                dc.utf8(dc.SESSION_ID, f"nas.example.net;1;{i}"),
                dc.utf8(dc.ORIGIN_HOST, "nas.example.net"),
                dc.utf8(dc.ORIGIN_REALM, "example.net"),
                dc.utf8(dc.DESTINATION_REALM, "ocs.example.net"),
                dc.u32(dc.AUTH_APPLICATION_ID, dc.APP_CREDIT_CONTROL),
                dc.utf8(dc.SERVICE_CONTEXT_ID, "32251@3gpp.org"),
                dc.u32(dc.CC_REQUEST_TYPE, cc_type),
                dc.u32(dc.CC_REQUEST_NUMBER, cc_type - 1),
                sub,
                dc.Avp(
                    1032, (1004).to_bytes(4, "big"), dc.AVP_M, 10415
                ),  # 3GPP RAT-Type, a vendor AVP
                dc.grouped(
                    284, [dc.utf8(280, "relay.example.net"), dc.Avp(33, b"state")]
                ),  # Proxy-Info
            ]
            out[f"ccr-{name}-{tname}"] = dc.encode(
                dc.request(dc.CMD_CC, dc.APP_CREDIT_CONTROL, 100 + i, 200 + i, avps, proxiable=True)
            )
    cca = dc.answer(
        dc.decode(out["ccr-e164-i"]),
        dc.SUCCESS,
        "ocs.example.net",
        "ocs.example.net",
        [
            dc.grouped(dc.GRANTED_SERVICE_UNIT, [dc.u64(dc.CC_TOTAL_OCTETS, 1 << 20)]),
            dc.u32(dc.VALIDITY_TIME, 60),
        ],
    )
    out["cca"] = dc.encode(cca)
    out["stream-cer-dwr-ccr"] = out["cer"] + out["dwr"] + out["ccr-imsi-i"]
    return out


def api_seeds() -> dict[str, bytes]:
    """One request per file: a JSON header line (realm, method, target, headers), then the body."""

    def req(
        realm: str, method: str, target: str, headers: dict[str, str], body: bytes = b""
    ) -> bytes:
        return (
            json.dumps(
                {"realm": realm, "method": method, "target": target, "headers": headers}
            ).encode()
            + b"\n"
            + body
        )

    form = {"content-type": "application/x-www-form-urlencoded"}
    js = {"content-type": "application/json"}
    out = {
        "login-json": req(
            "customer",
            "POST",
            "/rest/Session/login",
            js,
            b'{"params": {"login": "alice", "password": "pw"}}',
        ),
        "login-form": req(
            "account",
            "POST",
            "/rest/Session/login",
            form,
            b'params={"login":"1001","password":"pw"}',
        ),
        "get-account-info-bearer": req(
            "account",
            "POST",
            "/rest/Account/get_account_info",
            {**js, "authorization": "Bearer eyJ0eXAiOiJKV1Qi.abc.def"},
            b'{"params": {}}',
        ),
        "session-auth-info": req(
            "customer",
            "POST",
            "/rest/Customer/get_customer_info",
            form,
            b'auth_info={"session_id":"0123456789abcdef"}&params={}',
        ),
        "admin-entity": req(
            "admin",
            "POST",
            "/rest/Account/get_account_list",
            js,
            b'{"auth_info": {"session_id": "s1"}, "params": {"i_customer": 42, "offset": 0, "limit": 10}}',
        ),
        "admin-list": req(
            "admin",
            "POST",
            "/rest/Customer/get_customer_list",
            js,
            b'{"params": {"name": "acme%", "get_total": 1}}',
        ),
        "admin-create": req(
            "reseller",
            "POST",
            "/rest/Customer/add_customer",
            js,
            b'{"params": {"customer_info": {"name": "new", "i_parent": 7}}}',
        ),
        "set-context": req(
            "admin",
            "POST",
            "/rest/Session/set_session_context",
            js,
            b'{"params": {"system": "source"}}',
        ),
        "web-login": req(
            "customer", "POST", "/index.html", form, b"pb_auth_user=alice&pb_auth_password=pw"
        ),
        "web-page-cookie": req(
            "customer",
            "GET",
            "/customer/main.html?x=1",
            {"cookie": "PHPSESSID=abc; authorized-by-remote=1"},
        ),
        "multipart": req(
            "admin",
            "POST",
            "/rest/Invoice/upload",
            {"content-type": "multipart/form-data; boundary=XyZ"},
            b'--XyZ\r\nContent-Disposition: form-data; name="params"\r\n\r\n{"i_customer": 5}\r\n--XyZ--\r\n',
        ),
        "cpe-file": req("cpe", "GET", "/prov/0004f2a1b2c3.cfg", {}),
        "cpe-sep": req("cpe", "GET", "/SEP001122334455.cnf.xml", {}),
        "cpe-query": req("cpe", "GET", "/cfg?mac=00:11:22:33:44:55", {}),
        "cpe-inform": req(
            "cpe",
            "POST",
            "/cwmp",
            {"content-type": "text/xml", "soapaction": ""},
            b"<soap:Envelope><soap:Body><cwmp:Inform><DeviceId><Manufacturer>X</Manufacturer><OUI>0004F2</OUI><ProductClass>P</ProductClass><SerialNumber>0004F2A1B2C3</SerialNumber></DeviceId></cwmp:Inform></soap:Body></soap:Envelope>",
        ),
        "porting": req(
            "porting",
            "POST",
            "/rest/DID/get_number_info",
            js,
            b'{"params": {"number": "+1 555 000 1001"}}',
        ),
    }
    return out


def main() -> None:
    for name, seeds in (
        ("radius", radius_seeds()),
        ("diameter", diameter_seeds()),
        ("api", api_seeds()),
    ):
        d = HERE / f"corpus-{name}"
        d.mkdir(exist_ok=True)
        for old in d.glob("*.dat"):
            old.unlink()
        for seed, data in seeds.items():
            (d / f"{seed}.dat").write_bytes(data)
        print(f"{d}: {len(seeds)} seeds")


if __name__ == "__main__":
    main()
