"""``dsbc replay CAPTURE``: where every SIP request of a capture would go *now*, and why.

A routing report before a migration: read the SIP messages of a pcap / pcapng capture
(:mod:`dsbc.replay_capture`: UDP and reassembled TCP, IPv4 and IPv6) and classify each request the way
:class:`sip.proxy.ProxyCore` would, against the current store (read only): the system and
the identity that decided it, ``reject`` / ``404`` for an unknown identity under
``store.unknown = "reject"``, ``held`` for a customer being migrated, the 4xx a malformed
request gets.  ``--send HOST:PORT`` re-sends the capture's SIP messages over UDP instead.

Differences from the live proxy, by necessity: a Route or Request-URI carrying dsbc's
``dsbc=`` / ``ft=`` parameters is taken as dsbc's own whatever its address (the capture
may come from another node), node health is not considered, and CANCEL / ACK follow an
INVITE only when that INVITE is in the capture.
"""

from __future__ import annotations

import collections
import csv
import json
import os
import re
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

import click
import msgspec

from sip.errors import SipError
from sip.health import PING_BRANCH_PREFIX
from sip.message import SipMessage, parse_message
from sip.proxy import BRANCH_PREFIX, owner_candidates

from .cli import (
    CliError,
    FiniteFloat,
    config_options,
    load_cli_config,
    open_cli_store,
    system_label,
)
from .config import Config, parse_hostport
from .replay_capture import Capture, CaptureError, Message, read_capture
from .sip_service import StoreRouter, advertise, listeners, system_nodes, trusted_peers
from .store import LocationStore, some

# --- classifying requests ---------------------------------------------------------------------


class Row(msgspec.Struct):
    """What dsbc would do now with one request of the capture."""

    time: float
    transport: str
    src: str
    dst: str
    method: str
    call_id: str
    decision: str  # "target (MR115)", "reject 404", "held", "400", "dsbc 200", "device", ...
    action: str  # forward, reject, hold, answer, drop
    system: str = ""  # source / target when forwarded or held
    status: int = 0  # the SIP status dsbc itself would answer with
    customer_id: str = ""
    identity: str = ""  # kind:value that decided it
    reason: str = ""


def _hostport(addr: tuple[str, int]) -> str:
    ip, port = addr
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


class Classifier:
    """ProxyCore's routing decisions, without forwarding anything (see the module doc)."""

    def __init__(self, cfg: Config, store: LocationStore) -> None:
        self.cfg = cfg
        self.router = StoreRouter(store, trusted_peers(cfg))
        self.nodes = {(n.host, n.port): n.system for n in system_nodes(cfg)}
        host, ports = advertise(cfg)
        ours = {(host, p) for p in ports.values()}
        ours |= {(h, p) for _, h, p in listeners(cfg) if h not in ("0.0.0.0", "::")}
        self.ours = ours
        self.our_hosts = {h.lower() for h, _ in ours}
        self.our_ports = {p for _, p in ours}
        self.invites: dict[tuple[str, str, int | None, str], Row] = {}
        self.captured: dict[str, tuple[str, str]] = {}  # call-id -> (system, evidence)
        self.responses = 0
        self.bad_responses = 0
        self.dsbc_legs = 0

    def label(self, system: str) -> str:
        return system_label(self.cfg, system)

    def _observe(self, m: Message, msg: SipMessage | None) -> None:
        """Remember how the capture itself routed a dialog (to infer who would change)."""
        if msg is None or not msg.call_id:
            return
        node = self.nodes.get(m.dst) if msg.is_request else None
        if node:
            self.captured[msg.call_id] = (node, f"sent to {_hostport(m.dst)}")
            return
        for rr in msg.values("record-route"):
            sysname = re.search(r";\s*dsbc=(source|target)\b", rr)
            if sysname:
                self.captured.setdefault(msg.call_id, (sysname.group(1), "Record-Route dsbc="))
                return

    def classify(self, m: Message) -> Row | None:
        """The report row of a request; None for a response or dsbc's own outgoing leg."""
        req = m.is_request
        try:
            msg = parse_message(m.data, datagram=m.transport == "udp")
        except SipError as exc:
            if not req:
                self.responses += 1
                self.bad_responses += 1
                return None
            partial: SipMessage | None = getattr(exc, "partial", None)
            return self._row(
                m,
                partial,
                "drop" if not exc.respond else "reject",
                str(exc.status),
                status=exc.status,
                reason=f"{exc.reason}: {exc.detail}",
            )
        self._observe(m, msg)
        if not req:
            self.responses += 1
            return None
        if m.src in self.ours or msg.vias[0].branch.startswith((BRANCH_PREFIX, PING_BRANCH_PREFIX)):
            self.dsbc_legs += 1  # dsbc's own relayed copy (its routing is the capture's), or its health ping
            return None
        try:
            row = self._request(m, msg)
        except SipError as exc:
            row = self._row(
                m,
                msg,
                "reject",
                str(exc.status),
                status=exc.status,
                reason=f"{exc.reason}: {exc.detail}",
            )
        if msg.method == "INVITE" and msg.vias:
            top = msg.vias[0]
            self.invites[(top.branch, top.host.lower(), top.port, msg.call_id)] = row
        return row

    def _row(
        self, m: Message, msg: SipMessage | None, action: str, decision: str, **kw: Any
    ) -> Row:
        method = call_id = ""
        if msg is not None:
            method = msg.method
            try:
                call_id = msg.call_id
            except SipError:
                pass
        elif m.data:
            method = m.data.lstrip(b"\r\n").split(b" ", 1)[0][:20].decode("latin-1")
        return Row(
            m.time,
            m.transport,
            _hostport(m.src),
            _hostport(m.dst),
            method or "?",
            call_id,
            decision,
            action,
            **kw,
        )

    def _request(self, m: Message, msg: SipMessage) -> Row:
        method = msg.method
        uri = msg.uri
        routes = msg.routes
        if not routes and uri.user is None and self._is_ours(uri):
            if method == "OPTIONS":
                return self._row(
                    m,
                    msg,
                    "answer",
                    "dsbc 200",
                    status=200,
                    reason="keep-alive OPTIONS to dsbc itself: answered by dsbc",
                )
            if method not in ("REGISTER", "ACK"):
                return self._row(
                    m,
                    msg,
                    "reject",
                    "reject 404",
                    status=404,
                    reason="request to dsbc itself with no user",
                )
        mf = msg.max_forwards
        if mf is not None and mf <= 0:
            if method == "ACK":
                return self._row(m, msg, "drop", "dropped", reason="ACK with Max-Forwards 0")
            return self._row(
                m, msg, "reject", "483", status=483, reason="Too Many Hops: Max-Forwards 0"
            )
        if method not in ("ACK", "CANCEL") and msg.values("proxy-require"):
            return self._row(
                m,
                msg,
                "reject",
                "420",
                status=420,
                reason=f"Bad Extension: Proxy-Require {', '.join(msg.values('proxy-require'))}",
            )
        if method in ("ACK", "CANCEL"):
            top = msg.vias[0]
            inv = self.invites.get((top.branch, top.host.lower(), top.port, msg.call_id))
            if inv is not None:
                return self._follow(m, msg, inv)
        # our Record-Route came back: as the R-URI (a strict-routing previous hop), then as
        # the leading Route values
        params: dict[str, str] = {}
        hops = [r.uri for r in routes]
        if routes and uri.scheme in ("sip", "sips"):
            hops.insert(0, uri)
        for i, u in enumerate(hops):
            found = {k: v for k in ("dsbc", "ft") if (v := u.param(k))}
            if not found and i == 0 and len(hops) > len(routes):
                continue  # a loose-routing R-URI
            if not found:
                break
            params = {**found, **params}
        if "dsbc" in params:  # "target.<signature>": the signature is the live proxy's to check
            params["dsbc"] = params["dsbc"].rpartition(".")[0] or params["dsbc"]
        inside = self.router.is_trusted(*m.src) or m.src in self.nodes
        if method == "REGISTER" or not (msg.to_tag or inside):
            # as the proxy: never in a dialog; a device's Route without a To tag is no dialog
            params = {}
        if "ft" in params and inside:
            sysname = params.get("dsbc", "") or self.nodes.get(m.src, "")
            return self._row(
                m,
                msg,
                "forward",
                "device",
                system=sysname,
                reason="in-dialog: Route carries a flow token: toward the device"
                + (f" (dialog on {sysname})" if sysname else ""),
            )
        if params.get("dsbc") in ("source", "target"):
            sysname = params["dsbc"]
            return self._row(
                m,
                msg,
                "forward",
                self.label(sysname),
                system=sysname,
                reason=f"in-dialog: Route carries dsbc={sysname}",
            )
        return self._owner(m, msg)

    def _follow(self, m: Message, msg: SipMessage, inv: Row) -> Row:
        when = time.strftime("%H:%M:%S", time.gmtime(inv.time))
        if inv.action == "forward":
            return self._row(
                m,
                msg,
                "forward",
                inv.decision,
                system=inv.system,
                customer_id=inv.customer_id,
                identity=inv.identity,
                reason=f"{msg.method} follows its INVITE ({when})",
            )
        if inv.action == "hold" and msg.method == "CANCEL":
            return self._row(
                m,
                msg,
                "answer",
                "dsbc 200",
                status=200,
                customer_id=inv.customer_id,
                reason=f"CANCEL of a held INVITE ({when}): 200, and 487 to the INVITE",
            )
        if msg.method == "ACK" and inv.action in ("reject", "hold"):
            return self._row(
                m,
                msg,
                "drop",
                "dsbc (absorbed)",
                reason=f"ACK of dsbc's own answer to the INVITE ({when})",
            )
        return self._owner(m, msg)

    def _owner(self, m: Message, msg: SipMessage) -> Row:
        trusted = self.router.is_trusted(*m.src)
        candidates = owner_candidates(msg, trusted)
        if msg.method == "REGISTER":
            prefix = "REGISTER -> To "
        elif trusted:
            prefix = f"trusted peer {m.src[0]} -> R-URI "
        else:
            prefix = "From "
        decision = None
        for c in candidates:
            d = self.router.decide([c])
            if d.customer_id:
                decision = d
                break
        if decision is None:
            d = self.router.decide(candidates)
            identity = d.reason.split(" unknown", 1)[0].split(",")[0]
            if d.system == "reject":
                return self._row(
                    m,
                    msg,
                    "reject",
                    "reject 404",
                    status=404,
                    identity=identity,
                    reason=f"{prefix}{d.reason}: 404 Not Found",
                )
            return self._row(
                m,
                msg,
                "forward",
                self.label(d.system),
                system=d.system,
                identity=identity,
                reason=prefix + d.reason,
            )
        d = decision
        identity = d.reason.split(" -> ", 1)[0]
        reason = f"{prefix}{d.reason} ({d.system}, {d.state})"
        if d.state == "locked":
            return self._row(
                m,
                msg,
                "hold",
                "held",
                system=d.system,
                customer_id=d.customer_id,
                identity=identity,
                reason=f"{reason}; locked: would be held until the "
                f"migration commits (503 after store.lock_hold {self.cfg.store.lock_hold:g} s)",
            )
        return self._row(
            m,
            msg,
            "forward",
            self.label(d.system),
            system=d.system,
            customer_id=d.customer_id,
            identity=identity,
            reason=reason,
        )

    def _is_ours(self, uri: Any) -> bool:
        if uri.scheme not in ("sip", "sips"):
            return False
        return uri.host.strip("[]").lower() in self.our_hosts and uri.host_port[1] in self.our_ports


# --- the report ---------------------------------------------------------------------------------


def iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


class Summary:
    def __init__(self) -> None:
        self.requests = 0
        self.by_decision: collections.Counter[str] = collections.Counter()
        self.by_method: collections.Counter[str] = collections.Counter()
        self.unknown: collections.Counter[str] = collections.Counter()
        self.customers: dict[str, set[str]] = collections.defaultdict(set)
        self.now: dict[str, tuple[str, str]] = {}  # call-id -> (customer, system now)

    def add(self, row: Row) -> None:
        self.requests += 1
        self.by_decision[row.decision] += 1
        self.by_method[row.method] += 1
        if row.identity and not row.customer_id and row.action in ("forward", "reject"):
            self.unknown[row.identity] += 1
        if row.customer_id and row.system:
            self.customers[row.system].add(row.customer_id)
            if row.action == "forward" and row.call_id:
                self.now.setdefault(row.call_id, (row.customer_id, row.system))

    def changes(self, captured: dict[str, tuple[str, str]]) -> dict[str, tuple[str, str, str]]:
        """customer -> (system in the capture, system now, evidence)."""
        out: dict[str, tuple[str, str, str]] = {}
        for call_id, (customer, now) in self.now.items():
            was = captured.get(call_id)
            if was is not None and was[0] != now and customer not in out:
                out[customer] = (was[0], now, f"Call-ID {call_id}: {was[1]}")
        return out


def _ids(ids: set[str]) -> list[str]:
    return sorted(ids, key=lambda c: (len(c), c))


def summary_data(cap: Capture, cl: Classifier, s: Summary) -> dict[str, Any]:
    return {
        "packets": cap.packets,
        "sip_messages": len(cap.messages),
        "requests": s.requests,
        "responses": cl.responses,
        "malformed_responses": cl.bad_responses,
        "dsbc_legs": cl.dsbc_legs,
        "skipped_packets": cap.skipped,
        "ip_fragments": cap.fragments,
        "tcp_streams": cap.tcp_streams,
        "tcp_gaps": cap.tcp_gaps,
        "framing_errors": cap.framing_errors,
        "incomplete": cap.incomplete,
        "cut_short": cap.cut_short,
        "per_decision": dict(s.by_decision.most_common()),
        "per_method": dict(s.by_method.most_common()),
        "unknown_identities": dict(s.unknown.most_common(20)),
        "customers": {k: _ids(v) for k, v in sorted(s.customers.items())},
        "would_change": {
            c: {"from": a, "to": b, "evidence": e}
            for c, (a, b, e) in sorted(s.changes(cl.captured).items())
        },
    }


def print_text_row(row: Row, out: TextIO) -> None:
    out.write(
        f"{iso(row.time)}  {row.transport} {row.src}  {row.method}  {row.call_id or '-'}  "
        f"{row.decision}  {row.reason}\n"
    )


def _n(count: int, what: str, plural: str = "") -> str:
    return f"{count} {what if count == 1 else plural or what + 's'}"


_COUNTS = {  # summary key -> (singular, plural) for the text report's first line
    "dsbc_legs": (
        "request sent by dsbc itself (relayed, or a health ping; not reported)",
        "requests sent by dsbc itself (relayed, or health pings; not reported)",
    ),
    "malformed_responses": ("malformed response", ""),
    "tcp_streams": ("TCP stream", ""),
    "ip_fragments": ("IP fragment reassembled", "IP fragments reassembled"),
    "tcp_gaps": ("hole in TCP streams", "holes in TCP streams"),
    "framing_errors": ("TCP framing error", ""),
    "incomplete": ("incomplete message", ""),
}


def print_text_summary(cfg: Config, d: dict[str, Any], out: TextIO) -> None:
    w = out.write
    notes = [_n(d["skipped_packets"], "non-SIP packet skipped", "non-SIP packets skipped")]
    notes += [_n(d[k], *names) for k, names in _COUNTS.items() if d[k]]
    if d["cut_short"]:
        notes.append("the file is cut short: its last packet is incomplete")
    w(
        f"\n{_n(d['requests'], 'request')}, {_n(d['responses'], 'response')} "
        f"in {_n(d['packets'], 'packet')} ({'; '.join(notes)})\n"
    )
    w("requests per system:\n")
    for k, n in d["per_decision"].items():
        w(f"  {k:<24} {n}\n")
    w("requests per method:\n")
    for k, n in d["per_method"].items():
        w(f"  {k:<24} {n}\n")
    if d["unknown_identities"]:
        w("unknown identities (top 20):\n")
        for k, n in d["unknown_identities"].items():
            w(f"  {k:<24} {n}\n")
    w("customers seen per system:\n")
    for system in ("source", "target"):
        ids = d["customers"].get(system, [])
        w(f"  {system_label(cfg, system)}: {len(ids)}" + (f" ({some(ids)})" if ids else "") + "\n")
    if d["would_change"]:
        w("customers that would change system (vs. the capture's own routing):\n")
        for c, v in d["would_change"].items():
            w(
                f"  {c}: {system_label(cfg, v['from'])} -> {system_label(cfg, v['to'])} ({v['evidence']})\n"
            )


CSV_FIELDS = [
    "time",
    "transport",
    "src",
    "dst",
    "method",
    "call_id",
    "decision",
    "action",
    "system",
    "status",
    "customer_id",
    "identity",
    "reason",
]


def report(cfg: Config, store: LocationStore, cap: Capture, fmt: str, out: TextIO) -> None:
    cl = Classifier(cfg, store)
    s = Summary()
    rows: list[Row] = []
    writer = csv.writer(out, lineterminator="\n") if fmt == "csv" else None
    if writer is not None:
        writer.writerow(CSV_FIELDS)
    for m in cap.messages:
        row = cl.classify(m)
        if row is None:
            continue
        s.add(row)
        if fmt == "text":
            print_text_row(row, out)
        elif writer is not None:
            writer.writerow([iso(row.time) if f == "time" else getattr(row, f) for f in CSV_FIELDS])
        else:
            rows.append(row)
    d = summary_data(cap, cl, s)
    if fmt == "text":
        print_text_summary(cfg, d, out)
    elif fmt == "json":
        doc = {
            "requests": [
                {**msgspec.to_builtins(r), "time": iso(r.time), "ts": r.time} for r in rows
            ],
            "summary": d,
        }
        out.write(json.dumps(doc, indent=2) + "\n")


# --- re-sending ---------------------------------------------------------------------------------


def _schedule(
    msgs: list[Message], speed: float, rate: float | None
) -> Iterator[tuple[float, Message]]:
    """(seconds after the start, message): the capture's own timing / speed, or a fixed rate."""
    t0 = msgs[0].time if msgs else 0.0
    for i, m in enumerate(msgs):
        yield (i / rate if rate else max(0.0, m.time - t0) / speed), m


def send(
    cap: Capture, host: str, port: int, everything: bool, speed: float, rate: float | None
) -> tuple[int, int, int]:
    """Re-send the SIP messages over UDP from one local socket: (sent, failed, not sent)."""
    msgs = [m for m in cap.messages if everything or m.is_request]
    try:
        family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    except (OSError, UnicodeError) as exc:
        raise CliError(f"--send {host}:{port}: cannot resolve {host!r} ({exc})") from None
    sent = failed = 0
    start = time.monotonic()
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        for offset, m in _schedule(msgs, speed, rate):
            # in steps: a gap of years between two packets (a clock jump in the capture)
            # must not overflow time.sleep
            while (delay := start + offset - time.monotonic()) > 0:
                time.sleep(min(delay, 3600.0))
            try:
                sock.sendto(m.data, addr)
                sent += 1
            except OSError:
                failed += 1  # too large for a datagram, or ICMP unreachable from a previous send
    return sent, failed, len(cap.messages) - len(msgs)


def _read(path: str) -> Capture:
    try:
        return read_capture(path)
    except CaptureError as exc:
        raise CliError(str(exc)) from None


def parse_rate(text: str) -> float:
    value = text.strip().lower().removesuffix("/s").strip()
    try:
        rate = float(value)
    except ValueError:
        rate = 0.0
    if not 0.001 <= rate <= 1e6:
        raise CliError(
            f"--rate: {text!r} is not a number of messages per second between 0.001 and "
            "1000000 (e.g. 50/s)"
        )
    return rate


# --- the command --------------------------------------------------------------------------------


@click.command("replay")
@click.argument("capture", metavar="CAPTURE.pcap")
@click.option(
    "--send",
    "send_to",
    metavar="HOST:PORT",
    help="Re-send the capture's SIP requests over UDP to HOST:PORT (no report).",
)
@click.option("--all", "everything", is_flag=True, help="With --send: responses too.")
@click.option(
    "--speed",
    type=FiniteFloat(min=0.001, max=1e6),
    default=1.0,
    show_default=True,
    help="With --send: the capture's own timing, this many times faster.",
)
@click.option(
    "--rate",
    metavar="N/s",
    help="With --send: N messages per second instead of the capture's timing.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "json", "csv"]),
    default="text",
    show_default=True,
    help="Report format (csv: one row per request, no summary).",
)
@config_options
def replay_command(
    capture: str, send_to: str | None, everything: bool, speed: float, rate: str | None, fmt: str
) -> int:
    """Per SIP request in CAPTURE (pcap or pcapng): the system it would go to now, and why.

    A routing report before a migration, against the current store (read only), with a
    summary: requests per system and per method, unknown identities, customers per system,
    and customers that would change system compared to the capture's own routing.
    With --send, re-send the capture's SIP messages to HOST:PORT instead."""
    per_second = parse_rate(rate) if rate is not None else None
    ctx = click.get_current_context()
    given = {name for name in ("everything", "speed", "rate", "fmt")
             if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT}
    if send_to is None and given & {"everything", "speed", "rate"}:  # --speed was taken and ignored
        raise click.UsageError("--all, --speed and --rate go with --send")
    if send_to is not None and "fmt" in given:  # no report is made: the format was ignored
        raise click.UsageError("--format is the report's: --send makes none")
    if {"speed", "rate"} <= given:  # --rate replaces the capture's timing: --speed was ignored
        raise click.UsageError("give --speed or --rate, not both")
    if send_to is not None:
        try:
            host, port = parse_hostport(send_to)
        except ValueError as exc:
            raise CliError(f"--send: {exc} (give HOST:PORT)") from None
        cap = _read(capture)
        sent, failed, left = send(cap, host.strip("[]"), port, everything, speed, per_second)
        what = "SIP messages" if everything else "SIP requests"
        note = f", {failed} failed" if failed else ""
        note += f", {_n(left, 'response')} not sent (--all sends them)" if left else ""
        click.echo(f"sent {sent} {what} to {send_to} over UDP{note}")
        return 1 if failed else 0
    cfg = load_cli_config(store_only=True)
    cap = _read(capture)
    try:
        with open_cli_store(cfg) as store:
            report(cfg, store, cap, fmt, sys.stdout)
    except BrokenPipeError:  # `dsbc replay x.pcap | head`: stop quietly, at exit too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
