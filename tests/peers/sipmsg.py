"""Just enough SIP text parsing for test assertions on messages peers received.

Not the product's parser (that is sip/): a forgiving reader for raw messages captured by
pjsua2 or sipp, e.g. to check the X-System or Record-Route headers of an INVITE.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["SipText", "parse_message"]

_COMPACT = {
    "i": "call-id", "m": "contact", "e": "content-encoding", "l": "content-length",
    "c": "content-type", "f": "from", "s": "subject", "k": "supported", "t": "to",
    "v": "via", "o": "event", "u": "allow-events", "r": "refer-to", "b": "referred-by",
    "x": "session-expires", "a": "accept-contact", "j": "reject-contact", "d": "request-disposition",
}  # fmt: skip


@dataclass
class SipText:
    start_line: str
    headers: dict[str, list[str]] = field(default_factory=dict)  # lowercase full names
    body: str = ""

    @property
    def is_request(self) -> bool:
        return not self.start_line.startswith("SIP/2.0 ")

    @property
    def status(self) -> int | None:
        return int(self.start_line.split()[1]) if not self.is_request else None

    @property
    def method(self) -> str | None:
        return self.start_line.split()[0] if self.is_request else None

    def get(self, name: str) -> str | None:
        """First value of a header (any case, compact forms understood), or None."""
        values = self.headers.get(_norm(name))
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        """Every value of a header, in order (one entry per header line)."""
        return list(self.headers.get(_norm(name), []))


def _norm(name: str) -> str:
    name = name.strip().lower()
    return _COMPACT.get(name, name)


def parse_message(raw: str) -> SipText:
    """Split a raw SIP message into start line, headers (folded lines joined) and body."""
    text = raw.replace("\r\n", "\n").lstrip("\n")
    head, _, body = text.partition("\n\n")
    lines = head.split("\n")
    msg = SipText(start_line=lines[0].strip(), body=body)
    current: str | None = None
    for line in lines[1:]:
        if line[:1] in (" ", "\t") and current is not None:  # folded continuation
            values = msg.headers[current]
            values[-1] = values[-1] + " " + line.strip()
            continue
        name, sep, value = line.partition(":")
        if not sep:
            continue
        current = _norm(name)
        msg.headers.setdefault(current, []).append(value.strip())
    return msg
