"""An emulated back-end SIP system: a small PortaSIP node for ``dsbc demo`` and quick tests.

``SipSystem`` listens on UDP and TCP on one port and is at once

- a **registrar** (no authentication): bindings per AOR user with their Path (RFC 3327)
  and the address the REGISTER came from; ``registered(user)`` lists them;
- a **proxy** for calls to registered users and DIDs: the request goes to the first Path
  URI (through dsbc) with a Route set holding the Path, R-URI = the contact, our
  Record-Route and Via, to every phone of the account at once (forking); responses come
  back by Via (``sip_relay``);
- with a ``peer`` (the dispatcher, as ``dsbc demo`` sets it), an **outbound route**: an
  INVITE, MESSAGE, SUBSCRIBE or REFER for a user with no binding here goes to the peer
  once (the user may be the other system's); one that comes back is served here;
- a **user agent** answering calls to ``echo``, to known users that are not registered
  (and to anyone with ``answer_all``): 100, 180, 200 with SDP; BYE, re-INVITE, CANCEL,
  OPTIONS, MESSAGE in the dialog (``sip_uas``);
- a **health responder**: OPTIONS to the node itself gets 200.

Every response and request it sends carries ``X-System: <name>``, and ``calls`` logs each
INVITE (call id, from, to, mode, state, history) so a test or the demo can show which
system handled what.  Malformed requests get 400 (or the status their error names) when
they can be answered, and are dropped otherwise; nothing in a message stops the node.

Manual use: ``python -m dsbc.emulator.sip_system --name MR100 --port 5070``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import secrets
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, Self

from sip.errors import SipError
from sip.message import SipMessage, make_response, parse_message
from sip.uri import SipUri, parse_name_addr, parse_uri, unescape

from .sip_net import Hop, OnFail, SipNetwork
from .sip_registrar import Binding, Registrar
from .sip_relay import Relay
from .sip_uas import Responder

log = logging.getLogger("dsbc.emulator.sip")

ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, MESSAGE, REGISTER, INFO, UPDATE"
#: methods we know but do not serve out of a dialog (405 rather than 501)
_KNOWN = frozenset({"SUBSCRIBE", "NOTIFY", "PUBLISH", "REFER"})
#: methods that only make sense inside a dialog (481 out of one)
_DIALOG_ONLY = frozenset({"BYE", "INFO", "UPDATE", "PRACK"})
#: dialog-creating methods we Record-Route when relaying
_RECORD_ROUTE = frozenset({"INVITE", "SUBSCRIBE", "REFER"})
#: requests for a user with no binding here that go to the ``peer`` (the dispatcher) first
_TO_PEER = frozenset({"INVITE", "MESSAGE", "SUBSCRIBE", "REFER"})
MAX_CALL_LOG = 10000
TICK = 0.25
_NUMBER_JUNK = str.maketrans("", "", " -.()+")


def normalize_number(text: str) -> str:
    """``"+1 (555) 000-1001"`` -> ``"15550001001"``; "" when it is not a phone number."""
    digits = text.translate(_NUMBER_JUNK)
    return digits if digits.isdigit() else ""


class SipSystem:
    """One emulated SIP node.  ``await start()``, then ``port``; ``await stop()``.

    - ``transports``: ``udp`` and/or ``tcp``, both on the one ``port`` (0 = a free one);
    - ``answer_delay``: seconds between 180 and 200 for calls the system answers itself;
    - ``dids``: DID -> account; a call to the DID goes to the account's registration;
    - ``accounts``: known accounts; with ``dids`` values and every user that has ever
      registered here, a call to one of them that is not registered is answered by the
      system (a real node would play voicemail); other users get 404 ...
    - ... unless ``answer_all``: then every user that is not registered is answered;
    - ``advertise``: the address in Via, Record-Route and Contact (default ``host``);
    - ``max_expires``: longest registration granted; ``relay_timeout``: 408 after that
      long without a final response from the next hop;
    - ``clock``: wall clock of ``registered()``'s ``expires_at`` (tests may fake it).
    """

    def __init__(
        self,
        name: str = "MR100",
        host: str = "127.0.0.1",
        port: int = 0,
        transports: Iterable[str] = ("udp", "tcp"),
        answer_delay: float = 0.0,
        dids: dict[str, str] | None = None,
        *,
        accounts: Iterable[str] = (),
        answer_all: bool = False,
        advertise: str | None = None,
        max_expires: int = 3600,
        relay_timeout: float = 32.0,
        clock: Callable[[], float] = time.time,
        peer: tuple[str, int] | None = None,
    ) -> None:
        self.name = name
        self.host = host
        self.advertise = advertise or ("127.0.0.1" if host in ("", "0.0.0.0") else host)
        self.transports = tuple(t.lower() for t in transports)
        self.answer_delay = answer_delay
        self.dids = {normalize_number(k) or k: v for k, v in (dids or {}).items()}
        self.accounts = set(accounts)
        self.answer_all = answer_all
        self.relay_timeout = relay_timeout
        #: the dispatcher (UDP): where a call for a user with no binding here goes, once
        self.peer = Hop("udp", peer) if peer is not None else None
        self.clock = clock  # wall clock of registrations (``expires_at``)
        self.registrar = Registrar(max_expires)
        self.calls: list[dict[str, Any]] = []
        self.stats: Counter[str] = Counter()
        self._index: dict[str, dict[str, Any]] = {}
        self._tag_prefix = secrets.token_hex(3)
        self._tags = itertools.count(1)
        self.net = SipNetwork(host, port, self.transports, self._on_message, self._on_stream_error)
        self.responder = Responder(self)
        self.relay = Relay(self)
        self._ticker_task: asyncio.Task[None] | None = None
        self._own_hosts = {self.advertise, host} | ({"127.0.0.1"} if host in ("", "0.0.0.0") else set())

    # --- life cycle ------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self.net.port

    async def start(self) -> None:
        await self.net.start()
        self._ticker_task = asyncio.get_running_loop().create_task(self._ticker())
        log.info("%s: SIP on %s %s:%d", self.name, "/".join(self.transports), self.host, self.port)

    async def stop(self) -> None:
        if self._ticker_task is not None:
            self._ticker_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker_task
            self._ticker_task = None
        self.responder.close()
        self.relay.close()
        await self.net.stop()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _ticker(self) -> None:
        last_purge = 0.0
        while True:
            await asyncio.sleep(TICK)
            now = self.now()
            try:
                self.responder.tick(now)
                self.relay.tick(now)
                if now - last_purge > 10:
                    last_purge = now
                    self.registrar.purge(self.clock())
            except Exception:  # an emulator bug must not stop its timers
                self.stats["errors"] += 1
                log.exception("%s: timer error", self.name)

    # --- public views ------------------------------------------------------------------------

    def registered(self, user: str) -> list[tuple[str, list[str], float]]:
        """Live bindings of ``user`` (an account, or a DID mapped to one):
        ``(contact URI, Path values, expires_at)``, most recent first."""
        now = self.clock()
        bindings = self.registrar.lookup(user, now)
        if not bindings and normalize_number(user) in self.dids:
            bindings = self.registrar.lookup(self.dids[normalize_number(user)], now)
        return [(b.contact, list(b.path), b.expires_at) for b in bindings]

    def uri(self, transport: str = "udp") -> str:
        """The node's address as a SIP URI (what dsbc's config lists as a node)."""
        return self.own_uri(transport)

    # --- helpers for sip_uas / sip_relay ---------------------------------------------------

    @staticmethod
    def now() -> float:
        return time.monotonic()

    def new_tag(self) -> str:
        return f"{self._tag_prefix}{next(self._tags):x}"

    def sent_by(self) -> str:
        host = f"[{self.advertise}]" if ":" in self.advertise else self.advertise
        return f"{host}:{self.port}"

    def own_uri(self, transport: str = "udp") -> str:
        return f"sip:{self.sent_by()}" + (";transport=tcp" if transport == "tcp" else "")

    def contact_uri(self, transport: str = "udp") -> str:
        return f"<sip:{self.name}@{self.sent_by()}" + (";transport=tcp>" if transport == "tcp" else ">")

    def response(self, msg: SipMessage, status: int, reason: str,
                 extra: Iterable[tuple[str, str]] = (), to_tag: str | None = None, body: bytes = b"") -> bytes:
        """A response of our own; To gets a tag above 100 (``make_response`` keeps an existing one)."""
        if to_tag is None and status > 100:
            to_tag = self.new_tag()
        headers = list(extra)
        headers.append(("x-system", self.name))
        return make_response(msg, status, reason, headers, to_tag, body)

    def send(self, hop: Hop, data: bytes, on_fail: OnFail | None = None) -> None:
        self.stats["sent"] += 1
        self.net.send(hop, data, on_fail)

    def note(self, entry: dict[str, Any] | None, item: str | None, state: str | None) -> None:
        """Add ``item`` (a method or a status) to a call's history and set its state."""
        if entry is None:
            return
        if item:
            entry["history"].append(item)
            if not item[0].isdigit():
                entry["methods"].append(item)
        if state:
            entry["state"] = state

    def is_ours(self, uri: SipUri) -> bool:
        if uri.scheme not in ("sip", "sips") or not uri.host:
            return False
        host, port = uri.host_port
        return port == self.port and host in self._own_hosts

    def hop_for_uri(self, uri: SipUri) -> Hop | None:
        """Next hop for a URI: its host, port and transport (udp or tcp only)."""
        if uri.scheme != "sip" or not uri.host:
            return None
        transport = uri.transport
        if transport not in ("udp", "tcp"):
            return None
        host, port = uri.host_port
        return Hop(transport, ("127.0.0.1" if host == "localhost" else host, port))

    def _hop_for_binding(self, b: Binding) -> Hop | None:
        recv = b.received
        if b.path:
            uri = parse_name_addr(b.path[0]).uri
            hop = self.hop_for_uri(uri)
            # an outbound flow (;ob) over TCP: reuse the connection the REGISTER came on
            if (hop is not None and hop.transport == "tcp" and uri.has_param("ob")
                    and recv.transport == "tcp" and recv.conn is not None and not recv.conn.closed):
                return recv  # type: ignore[no-any-return]
            return hop
        if recv.transport == "udp" or (recv.conn is not None and not recv.conn.closed):
            return recv  # type: ignore[no-any-return]
        return self.hop_for_uri(parse_uri(b.contact))

    def _start_call(self, msg: SipMessage, mode: str, target: str | None = None) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "call_id": msg.call_id,
            "from": msg.from_.uri_text,
            "to": msg.to.uri_text,
            "ruri": msg.ruri,
            "system": self.name,
            "mode": mode,  # "local" (answered here), "relay" (to a registered contact), "rejected"
            "target": target,
            "state": "trying",
            "history": ["INVITE"],
            "methods": ["INVITE"],
            "started": self.clock(),
        }
        self.calls.append(entry)
        self._index[msg.call_id] = entry
        if len(self.calls) > MAX_CALL_LOG:
            del self.calls[: MAX_CALL_LOG // 10]
            self._index = {e["call_id"]: e for e in self.calls}
        return entry

    def _resolve(self, uri: SipUri) -> tuple[str, bool]:
        """The account a Request-URI names (DIDs mapped) and whether the system knows it."""
        user = unescape(uri.user or "").partition(";")[0]
        if not user:
            return "", False
        if user in self.accounts or user in self.registrar.seen:
            return user, True
        number = normalize_number(user)
        if number and number in self.dids:
            return self.dids[number], True
        return user, user in self.dids.values()

    # --- input -------------------------------------------------------------------------------

    def _on_message(self, data: bytes, hop: Hop, datagram: bool) -> None:
        self.stats["received"] += 1
        if not data.strip(b"\r\n"):
            return  # a UDP keep-alive
        msg: SipMessage | None = None
        try:
            msg = parse_message(data, datagram=datagram)
            if msg.is_request:
                self._request(msg, hop)
            elif not self.relay.response(msg, hop):
                self.stats["stray_responses"] += 1
        except SipError as exc:
            self._bad(exc, msg or getattr(exc, "partial", None), hop)
        except Exception:  # an emulator bug must not take the node down
            self.stats["errors"] += 1
            log.exception("%s: error handling a message from %s", self.name, hop)

    def _on_stream_error(self, exc: SipError, chunk: bytes, hop: Hop) -> None:
        """A TCP stream that cannot be framed: answer the request in ``chunk`` if we can."""
        msg: SipMessage | None = None
        try:
            msg = parse_message(chunk, datagram=True)
        except SipError as exc2:
            msg = getattr(exc2, "partial", None)
        except Exception:  # a codec bug: still close the stream cleanly
            log.exception("%s: parser error on a broken stream from %s", self.name, hop)
        self._bad(exc, msg, hop)

    def _bad(self, exc: SipError, msg: SipMessage | None, hop: Hop) -> None:
        self.stats["bad"] += 1
        log.debug("%s: bad message from %s: %s", self.name, hop, exc.detail)
        if msg is None or not msg.is_request or not exc.respond or msg.get("via") is None:
            return
        method = msg.method or (msg.get("cseq") or "").rpartition(" ")[2]
        if method == "ACK":
            return
        try:
            data = self.response(msg, exc.status, exc.reason, exc.extra_headers)
        except SipError:
            return
        self.send(hop, data)

    def _request(self, msg: SipMessage, hop: Hop) -> None:
        method = msg.method
        self.stats[method] += 1
        if method == "ACK":
            self._ack(msg, hop)
            return
        if method == "CANCEL":
            if not (self.relay.cancel(msg, hop) or self.responder.cancel(msg, hop)):
                self.send(hop, self.response(msg, 481, "Call/Transaction Does Not Exist"))
            return
        if self.relay.retransmission(msg, hop):
            return
        if method == "INVITE" and self.responder.retransmission(msg, hop):
            return
        routes = msg.routes
        ours = bool(routes) and self.is_ours(routes[0].uri)
        remaining = routes[1:] if ours else routes
        if remaining:  # loose routing: on to the next Route
            target = self.hop_for_uri(remaining[0].uri)
            if target is None:
                self.send(hop, self.response(msg, 503, "Service Unavailable"))
                return
            entry = self._index.get(msg.call_id)
            self.note(entry, method, "ended" if method == "BYE" else None)
            # RFC 6665 4.3, as Kamailio's default configuration: a subscriber may take its
            # route set from the first NOTIFY, so a NOTIFY in our dialog is record-routed
            self.relay.forward(msg, hop, target, pop_route=ours, entry=entry,
                               record_route=ours and method == "NOTIFY")
            return
        if method == "REGISTER":
            self._register(msg, hop)
        elif msg.to_tag:
            self._in_dialog(msg, hop, ours)
        else:
            self._out_of_dialog(msg, hop, ours)

    def _ack(self, msg: SipMessage, hop: Hop) -> None:
        if self.relay.ack(msg) or self.responder.ack(msg):
            return
        routes = msg.routes
        ours = bool(routes) and self.is_ours(routes[0].uri)
        remaining = routes[1:] if ours else routes
        if remaining:
            target = self.hop_for_uri(remaining[0].uri)
        elif msg.to_tag and not self.is_ours(msg.uri):
            target = self.hop_for_uri(msg.uri)
        else:
            target = None
        if target is None:
            self.stats["ack_dropped"] += 1
            return
        entry = self._index.get(msg.call_id)
        self.note(entry, "ACK", "confirmed" if entry is not None and entry["state"] == "answered" else None)
        self.relay.forward(msg, hop, target, pop_route=ours)

    def _register(self, msg: SipMessage, hop: Hop) -> None:
        to_uri = msg.to.uri
        user = unescape(to_uri.user or "") if to_uri.scheme in ("sip", "sips") else ""
        if not user:
            self.send(hop, self.response(msg, 400, "Bad Request (no user in To)"))
            return
        now = self.clock()
        bindings, granted = self.registrar.register(user, msg, hop, now)
        extra = [("contact", b.header_value(now)) for b in bindings]
        if granted is not None:
            extra.append(("expires", str(granted)))
        paths = msg.values("path")
        if paths:
            extra.append(("path", ", ".join(paths)))
        self.stats["registers"] += 1
        self.send(hop, self.response(msg, 200, "OK", extra))

    def _in_dialog(self, msg: SipMessage, hop: Hop, ours: bool) -> None:
        if self.responder.in_dialog(msg, hop):
            return
        target = None if self.is_ours(msg.uri) else self.hop_for_uri(msg.uri)
        if target is None:
            self.send(hop, self.response(msg, 481, "Call/Transaction Does Not Exist"))
            return
        entry = self._index.get(msg.call_id)
        self.note(entry, msg.method, "ended" if msg.method == "BYE" else None)
        self.relay.forward(msg, hop, target, pop_route=ours, entry=entry)

    def _out_of_dialog(self, msg: SipMessage, hop: Hop, ours: bool) -> None:
        method = msg.method
        user, known = self._resolve(msg.uri)
        bindings = self.registrar.lookup(user, self.clock()) if user and user != "echo" else []
        if bindings:
            # every phone of the account rings (parallel forking, as Kamailio's lookup does)
            targets = [(t, b.contact, b.path or None) for b in bindings if (t := self._hop_for_binding(b))]
            entry = self._start_call(msg, "relay", bindings[0].contact) if method == "INVITE" else None
            if not targets:
                self.send(hop, self.response(msg, 503, "Service Unavailable"))
                self.note(entry, "503", "failed 503")
                return
            self.relay.fork(msg, hop, targets, pop_route=ours, record_route=method in _RECORD_ROUTE, entry=entry)
            self.note(entry, None, "relaying")
            return
        if self.peer is not None and method in _TO_PEER and user != "echo" and not self._came_back(msg):
            # the user may live on the other system: the dispatcher routes it there by
            # Request-URI (SPEC 6, calls between the two systems), as a Kamailio with an
            # outbound route does; sent back (a user of ours, not registered) it is served below
            entry = self._start_call(msg, "peer") if method == "INVITE" else None
            self.relay.forward(msg, hop, self.peer, pop_route=ours, record_route=method in _RECORD_ROUTE,
                               entry=entry)
            self.note(entry, None, "relaying")
            return
        answer = user == "echo" or known or self.answer_all
        if method == "INVITE":
            if answer:
                self.responder.answer(msg, hop, self._start_call(msg, "local"))
            else:
                self.responder.reject(msg, hop, 404, "Not Found", self._start_call(msg, "rejected"))
        elif method == "OPTIONS":
            extra = [("allow", ALLOW), ("accept", "application/sdp"), ("server", f"dsbc-emulator {self.name}")]
            self.send(hop, self.response(msg, 200, "OK", extra))
        elif method == "MESSAGE":
            self.send(hop, self.response(msg, 200, "OK") if answer else self.response(msg, 404, "Not Found"))
        elif method in _DIALOG_ONLY:
            self.send(hop, self.response(msg, 481, "Call/Transaction Does Not Exist"))
        elif method in _KNOWN:
            self.send(hop, self.response(msg, 405, "Method Not Allowed", [("allow", ALLOW)]))
        else:
            self.send(hop, self.response(msg, 501, "Not Implemented", [("allow", ALLOW)]))

    def _came_back(self, msg: SipMessage) -> bool:
        """``msg`` already passed through this system (our own Via is in it)."""
        return any(v.host == self.advertise and (v.port or 5060) == self.port for v in msg.vias)


# --- command line ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsbc.emulator.sip_system",
                                description="Run one emulated back-end SIP system until Ctrl-C.")
    p.add_argument("--name", default="MR100", help="system name, sent as X-System (default MR100)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=5070, help="UDP and TCP port (default 5070; 0 = any)")
    p.add_argument("--transports", default="udp,tcp", help="comma-separated: udp,tcp (default both)")
    p.add_argument("--advertise", help="address written in Via, Record-Route and Contact")
    p.add_argument("--answer-delay", type=float, default=0.0, help="seconds of ringing before 200 OK")
    p.add_argument("--answer-all", action="store_true", help="answer calls to unknown users instead of 404")
    p.add_argument("--did", action="append", default=[], metavar="NUMBER=ACCOUNT", help="map a DID to an account")
    p.add_argument("--account", action="append", default=[], help="a known account (answered when not registered)")
    p.add_argument("--max-expires", type=int, default=3600, help="longest registration granted (default 3600)")
    p.add_argument("--peer", metavar="HOST:PORT", help="the dispatcher: where calls for users not registered here go first")
    p.add_argument("-v", "--verbose", action="store_true", help="log every bad message")
    args = p.parse_args(argv)
    dids: dict[str, str] = {}
    for item in args.did:
        number, sep, account = item.partition("=")
        if not sep or not normalize_number(number) or not account:
            p.error(f"--did {item!r}: expected NUMBER=ACCOUNT")
        dids[number] = account
    if not 0 <= args.port < 65536:
        p.error(f"--port {args.port}: out of range")
    peer: tuple[str, int] | None = None
    if args.peer:
        phost, _, pport = args.peer.rpartition(":")
        if not phost or not pport.isdigit() or not 0 < int(pport) < 65536:
            p.error(f"--peer {args.peer!r}: expected HOST:PORT")
        peer = (phost, int(pport))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        system = SipSystem(args.name, args.host, args.port, args.transports.split(","), args.answer_delay, dids,
                           accounts=args.account, answer_all=args.answer_all, advertise=args.advertise,
                           max_expires=args.max_expires, peer=peer)
    except ValueError as exc:
        p.error(str(exc))
    try:
        _run(_serve(system))
    except OSError as exc:
        print(f"{args.name}: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


async def _serve(system: SipSystem) -> None:
    await system.start()
    print(f"{system.name}: SIP {'/'.join(system.transports)} on {system.host}:{system.port} "
          f"(advertised as {system.own_uri()}); Ctrl-C stops", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await system.stop()


def _run(coro: Any) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(coro)


if __name__ == "__main__":
    sys.exit(main())
