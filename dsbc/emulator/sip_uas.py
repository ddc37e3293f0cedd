"""Calls answered by the emulated system itself (the ``echo`` user, known users that are
not registered, every user with ``answer_all``).

An INVITE gets 100, 180 and, after ``answer_delay`` seconds, 200 OK with a small SDP
answer, the system's own Contact and a To tag.  The 2xx is retransmitted over UDP until
the ACK arrives (RFC 3261 13.3.1.4).  In the dialog: re-INVITE, BYE, OPTIONS, MESSAGE,
INFO and UPDATE get 200.  CANCEL before the answer gets 200 and the INVITE 487.
Rejections (404 and the like) are remembered briefly so that their ACK is absorbed and a
retransmitted INVITE gets the same answer.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from sip.message import SipMessage

from .sip_net import Hop

if TYPE_CHECKING:
    from .sip_system import SipSystem

#: how long a finished call or rejected INVITE is kept to absorb retransmissions and ACKs
LINGER = 32.0
#: a confirmed call nobody hangs up is forgotten after this long
MAX_CALL = 4 * 3600.0
#: 2xx retransmission: first interval (T1) and cap (T2), given up after LINGER seconds
T1, T2 = 0.5, 4.0
_STATIC_RTPMAP = {"0": "PCMU/8000", "8": "PCMA/8000", "9": "G722/8000", "18": "G729/8000"}


class LocalCall:
    """An INVITE server transaction of the system's own UAS, and its dialog once answered."""

    __slots__ = (
        "acked",
        "call_id",
        "ended_at",
        "entry",
        "final_at",
        "hop",
        "interval",
        "invite",
        "key",
        "last",
        "sdp_version",
        "sent_at",
        "state",
        "tag",
        "timer",
    )

    def __init__(self, call_id: str, tag: str, key: tuple[str, str, int], invite: SipMessage,
                 hop: Hop, entry: dict[str, Any] | None) -> None:
        self.call_id = call_id
        self.tag = tag
        self.key = key
        self.invite = invite
        self.hop = hop
        self.entry = entry
        self.state = "trying"
        self.last = b""  # the latest response to the INVITE, resent on retransmissions
        self.timer: asyncio.TimerHandle | None = None
        self.final_at = 0.0
        self.acked = False
        self.sent_at = 0.0
        self.interval = T1
        self.ended_at = 0.0
        self.sdp_version = 1


def sdp_answer(offer: bytes, host: str, media_port: int, version: int) -> bytes:
    """A one-stream SDP answer taking the first audio format offered (and telephone-event),
    or an offer of PCMU/PCMA when the INVITE had no body."""
    formats = ["0", "8"]
    rtpmaps: dict[str, str] = {}
    for line in offer.decode("latin-1").splitlines():
        if line.startswith("m=audio "):
            parts = line.split()
            formats = parts[3:4] or ["0"]
        elif line.startswith("a=rtpmap:"):
            pt, _, enc = line[9:].partition(" ")
            rtpmaps[pt] = enc.strip()
            if enc.lower().startswith("telephone-event") and pt not in formats:
                formats.append(pt)
    ip = "IP6" if ":" in host else "IP4"
    lines = [
        "v=0",
        f"o=dsbc 1 {version} IN {ip} {host}",
        "s=dsbc emulator",
        f"c=IN {ip} {host}",
        "t=0 0",
        f"m=audio {media_port} RTP/AVP {' '.join(formats)}",
    ]
    for pt in formats:
        rtpmap = rtpmaps.get(pt) or _STATIC_RTPMAP.get(pt)
        if rtpmap:
            lines.append(f"a=rtpmap:{pt} {rtpmap}")
    lines.append("a=sendrecv")
    return ("\r\n".join(lines) + "\r\n").encode("latin-1")


class Responder:
    """The system's user agent server."""

    def __init__(self, system: SipSystem) -> None:
        self.sys = system
        self._by_key: dict[tuple[str, str, int], LocalCall] = {}
        self._by_dialog: dict[tuple[str, str], LocalCall] = {}
        self._media_port = 40000

    @staticmethod
    def key_of(msg: SipMessage) -> tuple[str, str, int]:
        return (msg.top_via.branch, msg.call_id, msg.cseq[0])

    # --- INVITE server transactions -----------------------------------------------------

    def retransmission(self, msg: SipMessage, hop: Hop) -> bool:
        """An INVITE we already answer: resend the latest response."""
        call = self._by_key.get(self.key_of(msg))
        if call is None:
            return False
        if call.last:
            self.sys.send(hop, call.last)
        return True

    def answer(self, msg: SipMessage, hop: Hop, entry: dict[str, Any] | None) -> None:
        """Answer a new INVITE: 100 and 180 now, 200 after ``answer_delay``."""
        sys = self.sys
        call = LocalCall(msg.call_id, sys.new_tag(), self.key_of(msg), msg, hop, entry)
        self._by_key[call.key] = call
        self._by_dialog[(call.call_id, call.tag)] = call
        sys.send(hop, sys.response(msg, 100, "Trying"))
        call.last = sys.response(msg, 180, "Ringing", self._dialog_headers(call), to_tag=call.tag)
        call.state = "ringing"
        sys.send(hop, call.last)
        sys.note(entry, "100", None)
        sys.note(entry, "180", "ringing")
        if sys.answer_delay > 0:
            call.timer = asyncio.get_running_loop().call_later(sys.answer_delay, self._answer, call)
        else:
            self._answer(call)

    def reject(self, msg: SipMessage, hop: Hop, status: int, reason: str, entry: dict[str, Any] | None,
               extra: list[tuple[str, str]] | None = None) -> None:
        sys = self.sys
        call = LocalCall(msg.call_id, sys.new_tag(), self.key_of(msg), msg, hop, entry)
        call.last = sys.response(msg, status, reason, extra or [], to_tag=call.tag)
        call.state = f"rejected {status}"
        call.final_at = call.ended_at = sys.now()
        self._by_key[call.key] = call
        sys.send(hop, call.last)
        sys.note(entry, str(status), call.state)

    def _dialog_headers(self, call: LocalCall) -> list[tuple[str, str]]:
        extra = [("contact", self.sys.contact_uri(call.hop.transport))]
        extra += [("record-route", rr) for rr in call.invite.values("record-route")]
        return extra

    def _answer(self, call: LocalCall) -> None:
        call.timer = None
        if call.state != "ringing":
            return
        sys = self.sys
        self._media_port = 40000 + (self._media_port - 40000 + 2) % 20000
        body = sdp_answer(call.invite.body, sys.advertise, self._media_port, call.sdp_version)
        extra = self._dialog_headers(call) + [("content-type", "application/sdp")]
        call.last = sys.response(call.invite, 200, "OK", extra, to_tag=call.tag, body=body)
        call.state = "answered"
        call.final_at = call.sent_at = sys.now()
        sys.send(call.hop, call.last)
        sys.note(call.entry, "200", "answered")

    def cancel(self, msg: SipMessage, hop: Hop) -> bool:
        """CANCEL of an INVITE we answer: 200, and 487 for the INVITE if still ringing."""
        call = self._by_key.get(self.key_of(msg))
        if call is None:
            return False
        sys = self.sys
        sys.send(hop, sys.response(msg, 200, "OK", to_tag=call.tag))
        sys.note(call.entry, "CANCEL", None)
        if call.state == "ringing":
            if call.timer is not None:
                call.timer.cancel()
                call.timer = None
            call.last = sys.response(call.invite, 487, "Request Terminated", to_tag=call.tag)
            call.state = "cancelled"
            call.final_at = call.ended_at = sys.now()
            sys.send(call.hop, call.last)
            sys.note(call.entry, "487", "cancelled")
        return True

    def ack(self, msg: SipMessage) -> bool:
        """ACK of a 2xx (by dialog) or of a non-2xx (by transaction): absorbed here."""
        call = self._by_dialog.get((msg.call_id, msg.to_tag)) if msg.to_tag else None
        if call is None:
            call = self._by_key.get(self.key_of(msg))
            if call is None:
                return False
        if not call.acked:
            call.acked = True
            self.sys.note(call.entry, "ACK", "confirmed" if call.state == "answered" else None)
            if call.state == "answered":
                call.state = "confirmed"
        return True

    # --- in-dialog requests --------------------------------------------------------------

    def in_dialog(self, msg: SipMessage, hop: Hop) -> bool:
        call = self._by_dialog.get((msg.call_id, msg.to_tag))
        if call is None:
            return False
        sys = self.sys
        method = msg.method
        sys.note(call.entry, method, None)
        if call.state in ("ended", "cancelled") or call.state.startswith("rejected"):
            if method == "BYE" and call.state == "ended":
                sys.send(hop, sys.response(msg, 200, "OK"))  # a retransmitted BYE
                sys.note(call.entry, "200", None)
            else:
                sys.send(hop, sys.response(msg, 481, "Call/Transaction Does Not Exist"))
                sys.note(call.entry, "481", None)
            return True
        if method == "BYE":
            call.state = "ended"
            call.ended_at = sys.now()
        if method == "INVITE":
            call.sdp_version += 1
            body = sdp_answer(msg.body, sys.advertise, self._media_port, call.sdp_version)
            extra = [("contact", sys.contact_uri(hop.transport)), ("content-type", "application/sdp")]
            call.last = sys.response(msg, 200, "OK", extra, body=body)
            call.hop = hop
            call.acked = False
            call.final_at = call.sent_at = sys.now()
            call.interval = T1
            sys.send(hop, call.last)
        elif method == "UPDATE" and msg.body:
            # RFC 3311 5.2: the 2xx to an UPDATE with an offer carries the answer
            call.sdp_version += 1
            body = sdp_answer(msg.body, sys.advertise, self._media_port, call.sdp_version)
            sys.send(hop, sys.response(msg, 200, "OK", [("content-type", "application/sdp")], body=body))
        else:
            sys.send(hop, sys.response(msg, 200, "OK"))
        sys.note(call.entry, "200", "ended" if method == "BYE" else None)
        return True

    # --- timers ----------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        for call in list(self._by_key.values()):
            if call.ended_at and now - call.ended_at > LINGER:
                self._forget(call)
                continue
            if call.final_at and now - call.final_at > MAX_CALL:
                self._forget(call)
                continue
            if call.final_at and not call.acked and call.state in ("answered", "confirmed"):
                if now - call.final_at > LINGER:
                    call.acked = True  # give up: the caller never confirmed
                    if call.state == "answered":
                        call.state = "ended"
                        call.ended_at = now
                        self.sys.note(call.entry, None, "no ACK")
                elif call.hop.transport == "udp" and now - call.sent_at >= call.interval:
                    call.sent_at = now
                    call.interval = min(call.interval * 2, T2)
                    self.sys.send(call.hop, call.last)

    def _forget(self, call: LocalCall) -> None:
        self._by_key.pop(call.key, None)
        self._by_dialog.pop((call.call_id, call.tag), None)

    def close(self) -> None:
        for call in self._by_key.values():
            if call.timer is not None:
                call.timer.cancel()
        self._by_key.clear()
        self._by_dialog.clear()

    def __len__(self) -> int:
        return len(self._by_key)
