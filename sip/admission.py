"""What a SIP message must pass before it is parsed: rate limit and scanner filter. No I/O.

The transports call ``Admission.check(data, flow, now)`` for every datagram and every
framed stream message, before ``ProxyCore.handle_data``:

* ``None``: admitted, go on;
* ``[]``: dropped (a scanner, or a flooding source that already had its answers);
* ``[Send]``: answered here (503 with Retry-After to a source above ``sip.rate_limit``,
  513 to a datagram above ``sip.max_message_size``).

Trusted peers (carriers, the systems' nodes) are exempt from both checks: their volume is
the business, and a spoofed carrier address cannot be told from the carrier anyway.

Counters (in the proxy's counter set, so they show in status and metrics):
``rate_limited`` (every message refused for rate), ``rate_limited_answered``,
``scanners_dropped``, ``too_large``.  A source that becomes blocked is logged once per block, with the
log itself bounded (``LOG_BURST`` lines per ``window``, then a summary count).

Perf note: for a source that is not trusted, one cached dict lookup (trust), one dict
lookup and a few float operations (rate), one regex over the header section (scanners).
Only the answers to a flood are parsed, and they are bounded by the limiter.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import math
from collections.abc import Callable
from typing import Final

from .errors import SipError
from .flow import Flow
from .logbudget import LogBudget
from .message import SipMessage, make_response, parse_message
from .proxy import Send, _with_received
from .ratelimit import RateLimiter, Verdict
from .scanner import ScannerFilter

__all__ = ["Admission"]

log = logging.getLogger("dsbc.sip.security")

LOG_BURST: Final = 10


def _to_tag(call_id: str) -> str:
    # the To tag the proxy core puts on its own final answers (sip.proxy._hash(call_id, 5)):
    # the same here, so the core recognises the ACK of a 503 given by the limiter
    return hashlib.blake2b(call_id.encode("utf-8", "surrogateescape"), digest_size=5).hexdigest()


class Admission:
    __slots__ = (
        "_limited_headers",
        "_log",
        "counters",
        "drop",
        "is_trusted",
        "limiter",
        "max_message_size",
        "scanners",
        "server",
    )  # fmt: skip

    def __init__(
        self,
        *,
        is_trusted: Callable[[str, int], bool],
        counters: collections.Counter[str],
        limiter: RateLimiter | None = None,
        scanners: ScannerFilter | None = None,
        drop: bool = False,
        server: str = "dsbc",
        max_message_size: int = 65535,
    ) -> None:
        self.limiter = limiter
        self.scanners = scanners
        self.is_trusted = is_trusted
        self.counters = counters
        self.drop = drop
        retry_after = str(max(1, math.ceil(limiter.window))) if limiter is not None else "1"
        self._limited_headers = [
            ("retry-after", retry_after),
            ("server", server),
            ("warning", '399 dsbc "rate limited"'),
        ]
        self.server = server
        self.max_message_size = max_message_size
        self._log = LogBudget(log, "sources over the SIP rate limit", LOG_BURST,
                              limiter.window if limiter is not None else 60.0)

    @property
    def active(self) -> bool:
        return self.limiter is not None or self.scanners is not None

    def check(self, data: bytes, flow: Flow, now: float) -> list[Send] | None:
        trusted = self.is_trusted(flow.ip, flow.port)
        limiter = self.limiter
        if limiter is not None and not trusted:
            verdict = limiter.check(flow.ip, now)
            if verdict:
                self.counters["rate_limited"] += 1
                if limiter.newly_blocked:
                    self._report(now)
                if verdict is Verdict.DROP or self.drop:
                    return []
                self.counters["rate_limited_answered"] += 1
                return self._answer(data, flow, 503, "Service Unavailable", self._limited_headers)
        if len(data) > self.max_message_size:
            # a datagram above the limit (streams are stopped earlier, by the framer)
            self.counters["too_large"] += 1
            return self._answer(data, flow, 513, "Message Too Large", [("server", self.server)])
        scanners = self.scanners
        if scanners is not None and not trusted and scanners.match(data):
            self.counters["scanners_dropped"] += 1
            return []
        return None

    def _answer(
        self, data: bytes, flow: Flow, status: int, reason: str, extra: list[tuple[str, str]]
    ) -> list[Send]:
        if data[:4] == b"SIP/":
            return []  # a response is never answered
        try:
            msg = parse_message(data, datagram=not flow.is_stream, max_size=len(data))
        except SipError as exc:
            partial: SipMessage | None = getattr(exc, "partial", None)
            if partial is None:
                return []
            msg = partial
        except Exception:  # noqa: BLE001 - a best-effort answer only; the core counts bad input
            return []
        try:
            if msg.method == "ACK":
                return []
            try:  # received / rport, as on every answer dsbc makes (RFC 3581 4)
                via: str | None = _with_received(msg.vias[0].text, flow.ip, flow.port)
            except (SipError, IndexError):
                via = None
            out = make_response(msg, status, reason, extra, to_tag=_to_tag(msg.call_id), top_via=via)
        except (SipError, ValueError):
            return []
        return [
            Send(
                flow.transport,
                flow.ip,
                flow.port,
                out,
                flow.conn_id,
                flow.worker if flow.is_stream else -1,
            )
        ]

    def _report(self, now: float) -> None:
        assert self.limiter is not None
        blocked = self.limiter.newly_blocked
        while blocked:
            self._log.log(
                logging.WARNING,
                "SIP source %s is over the rate limit (%d messages per %g s): %s",
                blocked.popleft(), self.limiter.limit, self.limiter.window,
                "dropped" if self.drop else "answered 503",
                now=now,
            )  # fmt: skip

    def status(self) -> dict[str, object]:
        out: dict[str, object] = {}
        if self.limiter is not None:
            blocked = self.limiter.blocked()
            out["rate_limit"] = {
                "limit": self.limiter.limit,
                "window": self.limiter.window,
                "sources_tracked": len(self.limiter),
                "sources_blocked": len(blocked),
                "blocked": blocked[:20],
                "blocks_total": self.limiter.blocked_total,
            }
        if self.scanners is not None:
            out["scanner_user_agents"] = list(self.scanners.names)
        return out
