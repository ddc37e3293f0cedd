"""Recognising well-known SIP scanners by User-Agent, on the raw octets, before parsing.

``ScannerFilter(["friendly-scanner", "sipvicious"]).match(data)`` is true when a
``User-Agent`` header of the header section contains one of the strings (ASCII case
insensitive).  Scanners (sipvicious, sipcli, ...) hammer every public SIP address with
OPTIONS and REGISTER probes; answering them only confirms that a server is there, so
dsbc drops them silently when ``sip.drop_scanners`` is on.

Perf note: one compiled regular expression searched over the header section only (so a
MESSAGE body quoting a scanner's name is not mistaken for one); nothing is decoded.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["ScannerFilter"]


class ScannerFilter:
    __slots__ = ("_re", "names")

    def __init__(self, user_agents: Sequence[str]) -> None:
        names = [u for u in user_agents if u]
        if not names:
            raise ValueError("no scanner User-Agent given")
        self.names = tuple(names)
        alternatives = b"|".join(re.escape(u.encode("utf-8")) for u in names)
        # the header name at the start of a line (after CRLF or a bare LF), any spacing
        # before the colon, then the pattern anywhere in that line's value
        self._re = re.compile(
            rb"\nuser-agent[ \t]*:[^\r\n]*?(?:" + alternatives + rb")", re.IGNORECASE
        )

    def match(self, data: bytes) -> bool:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            end = data.find(b"\n\n")
            if end < 0:
                end = len(data)
        return self._re.search(data, 0, end + 1) is not None
