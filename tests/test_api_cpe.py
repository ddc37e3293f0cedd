"""CPE provisioning and TR-069 through dsbc, before and after the customer's migration."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from tests.test_api_fastpath import read_answer
from tests.test_api_support import PROV, ApiEnv, run

MAC1, MAC4 = "0004f2a1b2c1", "0004f2a1b2c4"  # alice's phone (source), dave's (target)


def inform(serial: str) -> bytes:
    return (
        '<?xml version="1.0"?><soap-env:Envelope '
        'xmlns:soap-env="http://schemas.xmlsoap.org/soap/envelope/" '
        'xmlns:cwmp="urn:dslforum-org:cwmp-1-0"><soap-env:Header>'
        '<cwmp:ID soap-env:mustUnderstand="1">1</cwmp:ID>'
        "</soap-env:Header><soap-env:Body><cwmp:Inform><DeviceId><Manufacturer>Acme</Manufacturer>"
        f"<OUI>0004F2</OUI><ProductClass>HGW</ProductClass><SerialNumber>{serial}</SerialNumber></DeviceId>"
        "<Event><EventStruct><EventCode>2 PERIODIC</EventCode></EventStruct></Event>"
        "</cwmp:Inform></soap-env:Body></soap-env:Envelope>"
    ).encode()


async def fetch_cfg(env: ApiEnv, path: str) -> tuple[int, str, str]:
    async with env.http.get(env.url + path, headers={"Host": PROV}) as r:
        return r.status, await r.text(), r.headers.get("X-Billing-System", "")


async def cwmp_session(env: ApiEnv, serial: str) -> tuple[str, str]:
    """An Inform then the empty POST carrying the ACS's cookie; the systems of both."""
    hdrs = {"Host": PROV, "Content-Type": 'text/xml; charset="utf-8"', "SOAPAction": ""}
    async with env.http.post(env.url + "/cwmp", data=inform(serial), headers=hdrs) as r:
        assert r.status == 200, await r.text()
        first = r.headers["X-Billing-System"]
        cookie = r.headers["Set-Cookie"].split(";")[0]
    async with env.http.post(
        env.url + "/cwmp", data=b"", headers={"Host": PROV, "Cookie": cookie}
    ) as r:
        assert r.status == 204, "the ACS that saw the Inform must see the rest of the session"
        return first, r.headers["X-Billing-System"]


def test_config_files_by_mac_follow_the_owner(tmp_path: Path) -> None:
    async def main() -> None:
        async with ApiEnv(tmp_path) as env:
            for path, system in (
                (f"/prov/{MAC1}.cfg", "MR100"),
                (f"/prov/cfg{MAC1.upper()}.xml", "MR100"),
                (f"/prov/{MAC4}.cfg", "MR115"),
                ("/prov/phone.cfg?mac=00:04:f2:a1:b2:c4", "MR115"),
            ):
                st, text, served = await fetch_cfg(env, path)
                assert st == 200 and served == system and f"# {system} configuration" in text, path
            env.migrate("1")
            st, text, served = await fetch_cfg(env, f"/prov/{MAC1}.cfg")
            assert st == 200 and served == "MR115", (
                "after the migration alice's phone is provisioned by the target"
            )
            st, _, served = await fetch_cfg(env, "/prov/0004f2ffffff.cfg")
            assert st == 404 and served == "MR100"  # unknown device: store.unknown = source

    run(main)


def test_cwmp_inform_then_cookie_stick_to_the_owner(tmp_path: Path) -> None:
    async def main() -> None:
        async with ApiEnv(tmp_path) as env:
            assert await cwmp_session(env, "00:04:F2:A1:B2:C1") == ("MR100", "MR100")
            assert await cwmp_session(env, MAC4.upper()) == ("MR115", "MR115")
            env.migrate("1")
            assert await cwmp_session(env, "0004F2A1B2C1") == ("MR115", "MR115")

    run(main)


def test_a_cpe_without_cookies_stays_on_the_informs_system_for_its_connection(tmp_path: Path) -> None:
    """A CPE that does not return the ACS's cookie keeps its CWMP session on one TCP
    connection: its empty POST follows the Inform's system (dave's phone: the target),
    not the default system; another connection without a cookie gets the default."""

    async def main() -> None:
        async with ApiEnv(tmp_path) as env:
            host, _, port = env.url.removeprefix("http://").rpartition(":")

            def post(body: bytes) -> bytes:
                return (
                    f"POST /cwmp HTTP/1.1\r\nHost: {PROV}\r\nContent-Type: text/xml\r\n"
                    f"SOAPAction: \r\nContent-Length: {len(body)}\r\n\r\n"
                ).encode() + body

            def served_by(headers: list[bytes]) -> str:
                return next(h.split(b":", 1)[1].strip().decode() for h in headers
                            if h.lower().startswith(b"x-billing-system:"))

            r, w = await asyncio.open_connection(host, int(port))
            w.write(post(inform(MAC4.upper())))
            status, headers, _ = await read_answer(r)
            assert status.startswith(b"HTTP/1.1 200") and served_by(headers) == "MR115"
            w.write(post(b""))  # no Cookie header
            status, headers, _ = await read_answer(r)
            assert served_by(headers) == "MR115", status
            w.close()
            r, w = await asyncio.open_connection(host, int(port))
            w.write(post(b""))
            status, headers, _ = await read_answer(r)
            assert served_by(headers) == "MR100"  # a new connection: store.unknown = source
            w.close()

    run(main)


def test_macs_written_with_separators_and_in_the_user_agent_name_the_device(tmp_path: Path) -> None:
    """A file named by a MAC with colons or dashes, and a common file (Yealink's
    y000000000028.cfg, Polycom's 000000000000.cfg) fetched by a phone that names itself
    only in its User-Agent, go to the phone's owner (dave's phone: the target), not to
    the default system."""

    async def main() -> None:
        async with ApiEnv(tmp_path) as env:
            for path in ("/prov/00:04:f2:a1:b2:c4.cfg", "/prov/00-04-F2-A1-B2-C4-phone.cfg"):
                st, _, served = await fetch_cfg(env, path)
                assert st == 200 and served == "MR115", path
            for ua in (
                "Yealink SIP-T46S 66.85.0.5 00:04:f2:a1:b2:c4",
                "Cisco/SPA504G-7.5.5 (0004F2A1B2C4)(CCQ1234)",
                "Grandstream Model HW GXP2170 SW 1.0.11.3 DevId 0004f2a1b2c4",
            ):
                for path in ("/prov/y000000000028.cfg", "/prov/000000000000.cfg"):
                    async with env.http.get(
                        env.url + path, headers={"Host": PROV, "User-Agent": ua}
                    ) as r:
                        assert r.headers["X-Billing-System"] == "MR115", (ua, path)
            async with aiohttp.ClientSession() as http, http.get(  # (a new connection)
                env.url + "/prov/y000000000028.cfg",
                headers={"Host": PROV, "User-Agent": "Yealink SIP-T46S 66.85.0.5"},
            ) as r:
                assert r.headers["X-Billing-System"] == "MR100"  # names no device: the default

    run(main)


def test_panasonic_files_and_a_folder_per_mac_name_the_device(tmp_path: Path) -> None:
    """Panasonic phones fetch Config{MAC}.cfg (their CFG_STANDARD_FILE_PATH), and a
    provisioning server may keep a folder per device (/prov/<mac>/phone.xml, as it may with
    colons): they went to the default system (the source) though dave's phone is the
    target's."""

    async def main() -> None:
        async with ApiEnv(tmp_path) as env:
            for path in (f"/prov/Config{MAC4.upper()}.cfg", f"/prov/{MAC4}/phone.xml",
                         f"/prov/Panasonic/Config{MAC4}.cfg"):
                _, _, served = await fetch_cfg(env, path)
                assert served == "MR115", path

    run(main)


def test_operator_cpe_patterns_come_on_top_of_the_built_in_ones(tmp_path: Path) -> None:
    """deploy/dsbc.example.toml: api.cpe_patterns are "on top of the built-in <mac>.cfg,
    cfg<mac>.xml, SEP<mac>.cnf.xml and ?mac=<mac>"; one pattern of the operator's must not
    turn the built-in ones off."""

    async def main() -> None:
        extra = 'cpe_patterns = ["/prov/dev-(\\\\w{12})/"]'
        async with ApiEnv(tmp_path, extra_api=extra) as env:
            for path in (f"/prov/dev-{MAC4}/settings.xml", f"/prov/{MAC4}.cfg",
                         f"/prov/SEP{MAC4.upper()}.cnf.xml"):
                async with aiohttp.ClientSession() as http, http.get(  # a connection each
                    env.url + path, headers={"Host": PROV}
                ) as r:
                    assert r.status == 200 and r.headers["X-Billing-System"] == "MR115", path

    run(main)
