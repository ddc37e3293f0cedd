"""Reading SIP out of a pcap / pcapng capture, for ``dsbc replay``.

scapy reads the file formats and the link layers (Ethernet, Linux cooked, raw IP, ...);
the IP layer down is decoded here with ``struct``: IPv4 and IPv6 (extension headers,
fragments reassembled), UDP datagrams that carry SIP, and TCP flows reassembled per
direction by sequence number (reordering, retransmissions and holes) and split into
messages by :class:`sip.framing.StreamFramer`.  Everything else is counted and skipped.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import struct
from typing import Any

import msgspec

from sip.errors import SipError
from sip.framing import NEED_DATA, StreamFramer


class CaptureError(Exception):
    """The file is missing, unreadable or not a capture; str() is the one-line reason."""


# a SIP start line: "SIP/2.0 200 OK" or "METHOD uri SIP/2.0" (any version: 505 is reported)
_START_LINE = rb"(?:SIP/\d+\.\d+ |[A-Za-z!%'*+\-.0-9_`~]+ [^ \r\n]+ SIP/\d+\.\d+\r?$)"
_START = re.compile(rb"^" + _START_LINE)
#: where framing can resume in a stream: a start line at the start of a line
_RESYNC = re.compile(rb"^" + _START_LINE, re.MULTILINE)
_MAX_PENDING_FRAGMENTS = 10_000


def _looks_like_sip(data: bytes) -> bool:
    data = data.lstrip(b"\r\n")
    nl = data.find(b"\n", 0, 2048)
    return bool(_START.match(data[: nl if nl >= 0 else 2048]))


class Message(msgspec.Struct, gc=False):
    """One SIP message of the capture, as it was on the wire."""

    time: float
    transport: str  # "udp" or "tcp"
    src: tuple[str, int]
    dst: tuple[str, int]
    data: bytes

    @property
    def is_request(self) -> bool:
        return self.data.lstrip(b"\r\n")[:4] != b"SIP/"


class Capture(msgspec.Struct):
    messages: list[Message] = []
    packets: int = 0
    skipped: int = 0  # packets carrying no SIP (other protocols, keep-alives, non-IP)
    fragments: int = 0  # IP fragments reassembled into datagrams
    tcp_streams: int = 0  # TCP flows that carried SIP
    tcp_gaps: int = 0  # holes in a SIP stream (segments missing from the capture)
    framing_errors: int = 0
    incomplete: int = 0  # a SIP message cut off at the end of the capture
    cut_short: bool = False  # the file ends inside a packet (a capture copied or killed mid-write)


# --- reading a capture ----------------------------------------------------------------------


def read_capture(path: str) -> Capture:
    """Every SIP message of a pcap / pcapng file, in capture order; CaptureError if unreadable."""
    from scapy.error import Scapy_Exception
    from scapy.layers.inet import IP
    from scapy.layers.inet6 import IPv6
    from scapy.utils import PcapReader

    logging.getLogger("scapy").setLevel(logging.ERROR)  # truncated-file chatter
    cap = Capture()
    reader = _Reader(cap)
    try:
        with PcapReader(path) as packets:
            for pkt in packets:
                cap.packets += 1
                layer = pkt.getlayer(IP) or pkt.getlayer(IPv6)
                raw = bytes(layer) if layer is not None else bytes(pkt)
                if not raw or raw[0] >> 4 not in (4, 6):
                    cap.skipped += 1
                    continue
                reader.ip(raw, float(pkt.time))
    except (Scapy_Exception, EOFError, struct.error) as exc:
        if cap.packets == 0:
            raise CaptureError(f"{path}: not a pcap or pcapng capture ({exc})") from None
    except OSError as exc:
        raise CaptureError(f"{path}: cannot read: {exc.strerror or exc}") from None
    reader.finish()
    cap.cut_short = _cut_short(path)
    cap.messages.sort(key=lambda m: m.time)  # stable: same-time messages keep their order
    return cap


def _cut_short(path: str) -> bool:
    """The file ends inside a record: walks the pcap record headers (16 bytes, the
    captured length at offset 8) or the pcapng blocks (their total length at offset 4),
    which the reader above stops at without a word."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return False
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        order = "<" if magic[0] in (0xD4, 0x4D) else ">"
        at, head, length_at = 24, 16, 8
    elif magic == b"\x0a\x0d\x0d\x0a" and len(data) >= 12:
        order = "<" if data[8:12] == b"\x4d\x3c\x2b\x1a" else ">"
        at, head, length_at = 0, 0, 4
    else:
        return False
    if len(data) < at:
        return True
    while at < len(data):
        if at + max(head, 12) > len(data):
            return True
        (length,) = struct.unpack_from(order + "I", data, at + length_at)
        if head == 0 and length < 12:  # a pcapng block is 12 bytes at least: not ours to judge
            return False
        at += head + length
    return at > len(data)


class _Segment(msgspec.Struct, gc=False):
    time: float
    seq: int
    syn: bool
    data: bytes


class _Reader:
    """IPv4 / IPv6 (fragments, extension headers), UDP and TCP, decoded with struct."""

    def __init__(self, cap: Capture) -> None:
        self.cap = cap
        self.frags: dict[tuple[Any, ...], dict[str, Any]] = {}
        self.flows: dict[tuple[str, int, str, int], list[_Segment]] = {}

    def ip(self, d: bytes, t: float) -> None:
        if d[0] >> 4 == 4:
            if len(d) < 20:
                self.cap.skipped += 1
                return
            ihl = (d[0] & 15) * 4
            total = int.from_bytes(d[2:4], "big") or len(d)
            proto = d[9]
            src, dst = str(ipaddress.IPv4Address(d[12:16])), str(ipaddress.IPv4Address(d[16:20]))
            flags = int.from_bytes(d[6:8], "big")
            payload = d[ihl:total]
            if flags & 0x3FFF:  # MF or a fragment offset
                whole = self._fragment(
                    (4, src, dst, d[4:6], proto),
                    (flags & 0x1FFF) * 8,
                    bool(flags & 0x2000),
                    payload,
                    t,
                )
                if whole is None:
                    return
                payload = whole
            self._l4(proto, src, dst, payload, t)
            return
        if len(d) < 40:
            self.cap.skipped += 1
            return
        src, dst = str(ipaddress.IPv6Address(d[8:24])), str(ipaddress.IPv6Address(d[24:40]))
        plen = int.from_bytes(d[4:6], "big")
        self._ipv6_payload(d[6], src, dst, d[40 : 40 + plen] if plen else d[40:], t)

    def _ipv6_payload(self, nh: int, src: str, dst: str, p: bytes, t: float) -> None:
        off = 0
        while nh in (0, 43, 44, 51, 60) and off + 8 <= len(p):
            if nh == 44:  # fragment header
                fo = int.from_bytes(p[off + 2 : off + 4], "big")
                key = (6, src, dst, p[off + 4 : off + 8])
                whole = self._fragment(
                    key, fo & 0xFFF8, bool(fo & 1), p[off + 8 :], t, first_nh=p[off]
                )
                if whole is not None:
                    nh2, data = whole[0], whole[1:]
                    self._ipv6_payload(nh2, src, dst, data, t)
                return
            nh, off = p[off], off + ((p[off + 1] + 2) * 4 if nh == 51 else (p[off + 1] + 1) * 8)
        self._l4(nh, src, dst, p[off:], t)

    def _fragment(
        self,
        key: tuple[Any, ...],
        offset: int,
        more: bool,
        data: bytes,
        t: float,
        first_nh: int = -1,
    ) -> bytes | None:
        self.cap.fragments += 1
        entry = self.frags.setdefault(key, {"parts": {}, "end": -1, "nh": -1})
        entry["parts"][offset] = data
        if offset == 0 and first_nh >= 0:
            entry["nh"] = first_nh
        if not more:
            entry["end"] = offset + len(data)
        if entry["end"] < 0:
            if len(self.frags) > _MAX_PENDING_FRAGMENTS:
                self.frags.pop(next(iter(self.frags)))
            return None
        out = bytearray()
        for off in sorted(entry["parts"]):
            if off > len(out):
                return None  # a hole: wait for the missing fragment
            out[off:] = entry["parts"][off]
        if len(out) < entry["end"]:
            return None
        del self.frags[key]
        head = bytes([entry["nh"]]) if first_nh >= 0 else b""  # IPv6: the next header rides along
        return head + bytes(out)

    def _l4(self, proto: int, src: str, dst: str, p: bytes, t: float) -> None:
        if proto == 17 and len(p) >= 8:
            sport, dport, ulen = struct.unpack("!HHH", p[:6])
            data = p[8:ulen] if 8 <= ulen <= len(p) else p[8:]
            if _looks_like_sip(data):
                self.cap.messages.append(Message(t, "udp", (src, sport), (dst, dport), data))
            else:
                self.cap.skipped += 1
            return
        if proto == 6 and len(p) >= 20:
            sport, dport, seq = struct.unpack("!HHI", p[:8])
            off = (p[12] >> 4) * 4
            self.flows.setdefault((src, sport, dst, dport), []).append(
                _Segment(t, seq, bool(p[13] & 0x02), p[off:])
            )
            return
        self.cap.skipped += 1

    def finish(self) -> None:
        for (src, sport, dst, dport), segs in self.flows.items():
            before = len(self.cap.messages)
            self._stream(segs, (src, sport), (dst, dport))
            if len(self.cap.messages) > before:
                self.cap.tcp_streams += 1
            else:
                self.cap.skipped += len(segs)

    def _stream(self, segs: list[_Segment], src: tuple[str, int], dst: tuple[str, int]) -> None:
        """Order one direction of a TCP flow by sequence number and frame its SIP messages.

        After a hole (a segment the capture missed) or a framing error, the bytes are
        searched for the next SIP start line at the start of a line and framing resumes
        there; a message cut by the hole is counted as incomplete, never half-parsed."""
        syn = next((s for s in segs if s.syn), None)
        base = (syn.seq + 1) if syn else min(segs, key=lambda s: s.time).seq
        ordered = []
        for s in segs:
            if s.syn or not s.data:
                continue
            rel = (s.seq - base) & 0xFFFFFFFF
            ordered.append((rel - (1 << 32) if rel >= 1 << 31 else rel, s))
        ordered.sort(key=lambda x: (x[0], x[1].time))
        framer: StreamFramer | None = None
        pending = b""  # bytes searched for a start line while not in step
        nxt = min((r for r, _ in ordered), default=0) if syn is None else 0
        t_max = 0.0
        for rel, s in ordered:
            data = s.data
            if rel + len(data) <= nxt:
                continue  # a retransmission of what we already have
            if rel > nxt:
                self.cap.tcp_gaps += 1
                if framer is not None and framer.buffered > 4:
                    self.cap.incomplete += 1
                framer, pending = None, b""
            elif rel < nxt:
                data = data[nxt - rel :]
            nxt = max(nxt, rel) + len(data)
            t_max = max(t_max, s.time)
            if framer is None:
                pending += data
                m = _RESYNC.search(pending)
                if m is None:
                    pending = pending[-2048:]  # a start line may still be arriving
                    continue
                framer, data, pending = StreamFramer(), pending[m.start() :], b""
            framer.receive_data(data)
            try:
                while (ev := framer.next_event()) is not NEED_DATA:
                    if isinstance(ev, bytes):  # not a CRLF keep-alive
                        self.cap.messages.append(Message(t_max, "tcp", src, dst, ev))
                        t_max = s.time
            except SipError:
                self.cap.framing_errors += 1
                framer = None
        if framer is not None and framer.buffered > 4:  # more than a keep-alive
            self.cap.incomplete += 1
