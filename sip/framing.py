"""Stream framing for SIP over TCP/TLS (RFC 3261 18.3, RFC 5626 3.5.1 keep-alives). No I/O.

``receive_data(bytes)`` then ``next_event()`` until it returns ``NEED_DATA``.  Events are the
octets of one complete message, or ``PING`` (a CRLFCRLF keep-alive, to be answered with
``PONG``).  A bad or missing Content-Length raises ``FramingError``, a message above
``max_size`` raises ``MessageTooLarge``: after either the stream cannot be resynchronised,
and the adapter answers if it can and closes the connection.

Perf note: the buffer is a ``bytearray`` that remembers how far it was searched for the end
of the header section, so a message trickling in byte by byte is scanned once, not
once per read (aiosip's ``bytes +=`` re-scan is what we avoid).
"""

from __future__ import annotations

import re
from typing import Final

from .errors import FramingError, MessageTooLarge


class _Event:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA: Final = _Event("NEED_DATA")
PING: Final = _Event("PING")
PONG: Final = b"\r\n"

# the value may be folded onto continuation lines, as sip.message reads it
_CL_RE: Final = re.compile(rb"^(?:content-length|l)[ \t]*:((?:[^\r\n]|\r?\n[ \t])*)", re.IGNORECASE | re.MULTILINE)
_FOLD_RE: Final = re.compile(rb"\r?\n[ \t]+")
#: a Content-Length of more digits than this is above any max_size (and int() of a
#: 5000-digit value raises ValueError)
_MAX_CL_DIGITS: Final = 10


class StreamFramer:
    __slots__ = ("_buf", "_head_end", "_scanned", "_total", "max_size")

    def __init__(self, max_size: int = 65535) -> None:
        self._buf = bytearray()
        self._scanned = 0
        self._head_end = -1
        self._total = -1
        self.max_size = max_size

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def receive_data(self, data: bytes) -> None:
        self._buf += data

    def next_event(self) -> bytes | _Event:
        buf = self._buf
        if self._head_end < 0:
            # keep-alives and stray CRLFs between messages
            while buf[:2] == b"\r\n":
                if buf[:4] == b"\r\n\r\n":
                    del buf[:4]
                    self._scanned = 0
                    return PING
                if len(buf) < 4 and b"\r\n\r\n".startswith(bytes(buf)):
                    return NEED_DATA  # may still become a CRLFCRLF ping
                del buf[:2]  # a lone CRLF (a pong, or padding before a message)
                self._scanned = 0
            if not buf:
                return NEED_DATA
            start = max(0, self._scanned - 3)
            i = buf.find(b"\r\n\r\n", start)
            if i < 0:
                self._scanned = len(buf)
                if len(buf) > self.max_size:
                    raise MessageTooLarge("header section too large")
                return NEED_DATA
            head_end = i + 4
            if head_end > self.max_size:
                # checked before Content-Length so that the error does not depend on how
                # the stream was cut: cut earlier, the size check above would have fired
                raise MessageTooLarge("header section too large")
            matches = _CL_RE.findall(bytes(buf[:head_end]))
            if not matches:
                raise FramingError("missing Content-Length on a stream")
            lengths = set()
            for m in matches:
                value = _FOLD_RE.sub(b" ", m).strip(b" \t")
                # bytes.isdigit() is ASCII-only, unlike str.isdigit()
                if not value.isdigit():
                    raise FramingError(f"bad Content-Length {value[:20]!r}")
                if len(value) > _MAX_CL_DIGITS:
                    raise MessageTooLarge(f"Content-Length of {len(value)} digits")
                lengths.add(int(value))
            if len(lengths) != 1:
                raise FramingError("conflicting Content-Length values")
            self._head_end = head_end
            self._total = head_end + lengths.pop()
            if self._total > self.max_size:
                raise MessageTooLarge(f"{self._total} octets")
        if len(buf) < self._total:
            return NEED_DATA
        msg = bytes(buf[: self._total])
        del buf[: self._total]
        self._head_end = -1
        self._total = -1
        self._scanned = 0
        return msg
