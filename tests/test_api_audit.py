"""Found by the API acceptance audit: deep JSON, gzip uploads, creates racing a migration."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

from tests.test_api_badinput import fault_of, raw, still_fine
from tests.test_api_support import ADMIN, CUSTOMER, ApiEnv, run


def test_deeply_nested_json_gets_a_bad_request_fault(tmp_path: Path) -> None:
    """JSON nested deeper than the decoder takes is bad input (a fault), not a traceback
    and a dropped connection."""

    async def main() -> None:
        async with ApiEnv(tmp_path) as env:
            deep = "[" * 5000 + "]" * 5000
            bodies = [
                ("application/json", ('{"params":' + deep + "}").encode()),
                ("application/x-www-form-urlencoded", b"params=" + deep.encode()),
            ]
            for host in (CUSTOMER, ADMIN):
                for ctype, body in bodies:
                    for extra, payload in (
                        (f"Content-Length: {len(body)}\r\n", body),  # the fast path
                        (
                            "Transfer-Encoding: chunked\r\n",  # the aiohttp path
                            b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body),
                        ),
                    ):
                        head = (
                            f"POST /rest/Customer/get_customer_info HTTP/1.1\r\nHost: {host}\r\n"
                            f"Content-Type: {ctype}\r\n{extra}Connection: close\r\n\r\n"
                        )
                        doc = fault_of(await raw(env, head.encode() + payload))
                        assert doc["faultcode"] == "Server.Dispatcher.bad_request", (host, doc)
            assert env.api.metrics["internal_errors"] == 0
            await still_fine(env)

    run(main)
