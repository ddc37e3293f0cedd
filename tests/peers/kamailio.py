"""A real Kamailio as a SIP back-end system (source or target) for integration tests.

    with Kamailio("source", dids={"15550001001": "1001"}, workdir=tmp_path / "kam") as k:
        k.registered("1001")            # contacts stored for AOR 1001
        k.requests("INVITE")            # requests this system saw (parsed from its log)

The configuration comes from tests/peers/kamailio/kamailio.cfg.tmpl: registrar with Path,
location lookup, DID -> account rewrite (htable `dids`), record-routing proxy, an
"X-System: <name>" header on everything it relays or answers. Control is JSON-RPC over a
unix datagram socket (jsonrpcs module); no kamcmd/kamctl, no FIFO.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Self

from tests.peers.net import free_port, is_bound, loopback_alias_works, sip_options
from tests.peers.proc import PeerError, PeerProcess, find_binary, scratch_dir

__all__ = ["MODULES_DIR", "Kamailio", "KamailioError"]

TEMPLATE = Path(__file__).with_name("kamailio") / "kamailio.cfg.tmpl"
MODULES_DIR = next(
    (
        p
        for p in (
            "/usr/lib/x86_64-linux-gnu/kamailio/modules",
            "/usr/lib/aarch64-linux-gnu/kamailio/modules",
            "/usr/lib/kamailio/modules",
            "/usr/local/lib64/kamailio/modules",
            "/usr/local/lib/kamailio/modules",
        )
        if Path(p, "tm.so").exists()
    ),
    "/usr/lib/x86_64-linux-gnu/kamailio/modules",
)
_LOG_LINE = re.compile(r"DSBC-(REQ|REGISTER|DID) (.*)$")
_KV = re.compile(r"(\w+)=(\S*)")


class KamailioError(PeerError):
    """Kamailio did not start, answer or obey an RPC; the message carries its log tail."""


def _trusted_condition(peers: Iterable[str]) -> str:
    """Kamailio expression true when the source is one of `peers` ("IP" or "IP:PORT")."""
    terms = []
    for peer in peers:
        ip, _, port = peer.partition(":")
        socket.inet_aton(ip)  # IPv4 literal only; raises OSError otherwise
        term = f'$si == "{ip}"'
        if port:
            term = f"({term} && $sp == {int(port)})"
        terms.append(term)
    return " || ".join(terms) or '$si == "0.0.0.0"'


class Kamailio:
    """One Kamailio process listening on listen_ip:port (UDP, and TCP unless tcp=False).

    name: the system's name, sent in "X-System: <name>" on everything it relays or
    answers. port: None picks a free one (the same for UDP and TCP). dids: {did: account}
    for calls to numbers ("+" ignored). extra_trusted: "IP" or "IP:PORT" of peers that do
    their own NAT handling (dsbc): no received/alias fix-ups for what comes from them.
    outbound_mode: the registrar's RFC 5626 outbound_mode (1: supported, a phone with a
    reg-id whose first hop adds no ";ob" to its Path gets 439).
    outbound: (IP, PORT) or "sip:IP:PORT;transport=tcp" where requests for users that are
    neither registered nor DIDs go (dsbc, a carrier) instead of a 404.
    workdir: config and kamailio.log (None: a scratch directory removed at exit).
    """

    def __init__(
        self,
        name: str,
        listen_ip: str = "127.0.0.1",
        port: int | None = None,
        *,
        tcp: bool = True,
        dids: Mapping[str, str] | None = None,
        extra_trusted: Iterable[str] = (),
        outbound: tuple[str, int] | str | None = None,
        workdir: Path | None = None,
        debug: int = 2,
        shm_mb: int = 32,
        pkg_mb: int = 8,
        start_timeout: float = 15.0,
        binary: str = "kamailio",
        outbound_mode: int = 0,
    ) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"name must be a plain token (it goes into a header): {name!r}")
        if not listen_ip.startswith("127."):
            raise ValueError(f"tests bind loopback only, not {listen_ip}")
        self.name = name
        self.ip = listen_ip
        self.port = port
        self.tcp = tcp
        self.dids = {k.lstrip("+"): v for k, v in (dids or {}).items()}
        self.extra_trusted = list(extra_trusted)
        self.outbound = outbound
        self.debug = debug
        self.shm_mb = shm_mb
        self.pkg_mb = pkg_mb
        self.start_timeout = start_timeout
        self.binary = binary
        self.outbound_mode = outbound_mode
        self.workdir = Path(workdir) if workdir else scratch_dir(f"kamailio-{name}-")
        # Unix socket paths are limited to 107 bytes: keep the runtime dir short, in /tmp.
        self.rundir: Path | None = None
        self.proc: PeerProcess | None = None

    # -- addresses -------------------------------------------------------------------
    @property
    def addr(self) -> tuple[str, int]:
        if self.port is None:
            raise KamailioError(f"{self.name}: not started")
        return (self.ip, self.port)

    @property
    def hostport(self) -> str:
        return f"{self.addr[0]}:{self.addr[1]}"

    def uri(self, user: str | None = None, transport: str = "udp") -> str:
        """sip:[user@]ip:port[;transport=tcp]"""
        u = f"sip:{user + '@' if user else ''}{self.hostport}"
        return u + (";transport=tcp" if transport == "tcp" else "")

    @property
    def cfg_path(self) -> Path:
        return self.workdir / "kamailio.cfg"

    @property
    def log_path(self) -> Path:
        return self.workdir / "kamailio.log"

    # -- config ----------------------------------------------------------------------
    def render_config(self) -> str:
        assert self.rundir is not None and self.port is not None
        listen = [f"listen=udp:{self.ip}:{self.port}"]
        if self.tcp:
            listen.append(f"listen=tcp:{self.ip}:{self.port}")
        dids = "\n".join(
            f'\t$sht(dids=>{_token(k, "did")}) = "{_token(v, "account")}";'
            for k, v in self.dids.items()
        )
        subst = {
            "NAME": self.name,
            "DEBUG": str(self.debug),
            "RUNDIR": str(self.rundir),
            "RPCSOCK": str(self.rpc_socket),
            "MPATH": MODULES_DIR,
            "LISTEN": "\n".join(listen),
            "TCP_DISABLE": "" if self.tcp else "disable_tcp=yes",
            "DIDS": dids or "\treturn;",
            "TRUSTED": _trusted_condition(self.extra_trusted),
            "OUTBOUND": self._outbound_route(),
            # registrar: 1 supports RFC 5626 outbound (439 to a phone whose first hop lacks it)
            "REGISTRAR_OUTBOUND": f'modparam("registrar", "outbound_mode", {int(self.outbound_mode)})',
        }
        text = TEMPLATE.read_text()
        for key, value in subst.items():
            text = text.replace(f"@@{key}@@", value)
        leftover = re.search(r"@@\w+@@", text)
        if leftover:
            raise KamailioError(f"template placeholder {leftover.group()} not filled")
        return text

    def _outbound_route(self) -> str:
        if self.outbound is None:
            return "\treturn;"
        if isinstance(self.outbound, str):
            uri = self.outbound if self.outbound.startswith("sip:") else f"sip:{self.outbound}"
        else:
            uri = f"sip:{self.outbound[0]}:{int(self.outbound[1])}"
        if not re.fullmatch(r"sip:[0-9.]+:\d+(;transport=(udp|tcp))?", uri):
            raise ValueError(f"outbound must be IP:PORT or sip:IP:PORT[;transport=..], not {uri}")
        return f'\txlog("L_NOTICE", "DSBC-OUTBOUND $rU -> {uri}\\n");\n\t$du = "{uri}";\n\troute(RELAY);'

    @property
    def rpc_socket(self) -> Path:
        assert self.rundir is not None
        return self.rundir / "rpc.sock"

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> Self:
        if self.proc is not None:
            raise KamailioError(f"{self.name}: already started")
        binary = find_binary(self.binary)
        if binary is None:
            raise KamailioError(f"{self.binary} not found in PATH nor in sbin")
        if not loopback_alias_works(self.ip):
            raise KamailioError(f"cannot bind {self.ip}: loopback alias missing")
        if self.port is None:
            self.port = free_port("both" if self.tcp else "udp", self.ip)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.rundir = Path(tempfile.mkdtemp(prefix=f"kam{os.getpid()}-", dir="/tmp"))
        try:
            self._launch(binary)
        except BaseException:
            self.stop()
            raise
        return self

    def _launch(self, binary: str) -> None:
        assert self.rundir is not None
        self.cfg_path.write_text(self.render_config())
        argv: list[str | Path] = [
            binary, "-DD", "-E", "-f", self.cfg_path,
            "-m", str(self.shm_mb), "-M", str(self.pkg_mb),
            "-Y", self.rundir, "-P", self.rundir / "kamailio.pid",
            "-w", self.workdir, "-a", "no",
        ]  # fmt: skip
        self.proc = PeerProcess(f"kamailio-{self.name}", argv, self.log_path, guard=True)
        self.proc.start()
        self._wait_ready()

    def _wait_ready(self) -> None:
        assert self.proc is not None and self.port is not None
        deadline = time.monotonic() + self.start_timeout
        while True:
            if not self.proc.alive():
                raise KamailioError(
                    f"{self.name}: kamailio exited with {self.proc.returncode()} at start\n"
                    + self.proc.log_tail()
                )
            ready = (
                self.rpc_socket.exists()
                and (not self.tcp or is_bound(self.ip, self.port, "tcp"))
                and (reply := sip_options(self.ip, self.port, "udp", 0.2)) is not None
                and reply.startswith("SIP/2.0 200")
            )
            if ready:
                return
            if time.monotonic() > deadline:
                raise KamailioError(
                    f"{self.name}: no 200 to OPTIONS on {self.hostport} after "
                    f"{self.start_timeout:.0f}s\n" + self.proc.log_tail()
                )
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(grace=3.0)
            self.proc = None
        if self.rundir is not None:
            shutil.rmtree(self.rundir, ignore_errors=True)
            self.rundir = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- control ---------------------------------------------------------------------
    def rpc(self, method: str, *params: Any, timeout: float = 3.0) -> Any:
        """Call a Kamailio RPC (e.g. "ul.lookup", "htable.sets"); returns its "result"."""
        if self.rundir is None:
            raise KamailioError(f"{self.name}: not started")
        request = {"jsonrpc": "2.0", "method": method, "params": list(params), "id": 1}
        client = self.rundir / f"c{os.getpid()}-{time.monotonic_ns()}.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.bind(str(client))
            try:
                s.settimeout(timeout)
                s.sendto(json.dumps(request).encode(), str(self.rpc_socket))
                data = s.recv(1 << 20)
            except OSError as exc:
                raise KamailioError(f"{self.name}: rpc {method} failed: {exc}") from exc
            finally:
                client.unlink(missing_ok=True)
        reply = json.loads(data)
        if "error" in reply:
            raise KamailioError(f"{self.name}: rpc {method}: {reply['error']}")
        return reply.get("result")

    def registrations(self, user: str) -> list[dict[str, Any]]:
        """The contacts stored for AOR `user`, as Kamailio reports them (ul.lookup).

        Each dict has "Address" (the Contact URI), "Expires", "Path", "Received",
        "Socket", "User-Agent", "Q", ... Empty when nothing is registered.
        """
        try:
            result = self.rpc("ul.lookup", "location", user)
        except KamailioError as exc:
            if "not found" in str(exc).lower() or "no contacts" in str(exc).lower():
                return []
            raise
        contacts = (result or {}).get("Contacts") or []
        return [c.get("Contact", c) for c in contacts]

    def registered(self, user: str) -> list[str]:
        """Contact URIs currently registered for `user` (unexpired)."""
        return [str(c["Address"]) for c in self.registrations(user) if _unexpired(c)]

    def wait_registered(self, user: str, count: int = 1, timeout: float = 5.0) -> list[str]:
        """Wait until at least `count` contacts are registered for `user` (0: none)."""
        deadline = time.monotonic() + timeout
        while True:
            contacts = self.registered(user)
            if (len(contacts) >= count) if count else not contacts:
                return contacts
            if time.monotonic() > deadline:
                raise KamailioError(
                    f"{self.name}: {user} has {len(contacts)} contacts, wanted "
                    f"{'none' if not count else count} after {timeout:.1f}s: {contacts}"
                )
            time.sleep(0.05)

    def add_did(self, did: str, account: str) -> None:
        """Map a DID to an account at run time."""
        did = did.lstrip("+")
        self.rpc("htable.sets", "dids", _token(did, "did"), _token(account, "account"))
        self.dids[did] = account

    def remove_did(self, did: str) -> None:
        did = did.lstrip("+")
        self.rpc("htable.delete", "dids", did)
        self.dids.pop(did, None)

    # -- logs ------------------------------------------------------------------------
    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.logs().splitlines()[-lines:])

    def requests(self, method: str | None = None) -> list[dict[str, str]]:
        """Requests this Kamailio received, oldest first (from its log).

        Each dict: method, ruri, from, to, src ("udp:IP:PORT"), callid.
        """
        out = []
        for line in self.logs().splitlines():
            m = _LOG_LINE.search(line)
            if m and m.group(1) == "REQ":
                fields = dict(_KV.findall(m.group(2)))
                if method is None or fields.get("method") == method:
                    out.append(fields)
        return out

    def register_log(self) -> list[dict[str, str]]:
        """Every REGISTER handled, oldest first: aor, contact, expires, path, src."""
        out = []
        for line in self.logs().splitlines():
            m = _LOG_LINE.search(line)
            if m and m.group(1) == "REGISTER":
                out.append(dict(_KV.findall(m.group(2))))
        return out

    def __repr__(self) -> str:
        return f"Kamailio({self.name!r}, {self.ip}:{self.port}, tcp={self.tcp})"


def _unexpired(contact: dict[str, Any]) -> bool:
    # "Expires" is the seconds left, "permanent", or "expired" until the timer purges it.
    expires = contact.get("Expires")
    return expires != "expired" and not (isinstance(expires, int) and expires < 0)


def _token(value: str, what: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", value):
        raise ValueError(f"{what} must be a plain SIP user token: {value!r}")
    return value
