"""pjsua2 SIP phones for integration tests, each in its own process.

    with Phone("1001", *k.addr, transport="tcp", workdir=tmp_path) as p:
        assert p.register(expires=120) == 200
        call = p.wait_incoming_call(timeout=5)          # auto-answered with 200
        assert p.received_invite(call).get("X-System") == "source"
        p.hangup(call)

The phone runs in `python -m tests.peers.phone_agent` (see that module): a crash or hang of
the C library cannot take pytest down, and every request to it is bounded by a timeout
after which the agent is killed and PhoneError raised with its log tail.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
from pathlib import Path
from typing import IO, Any, Self

from tests.peers.net import loopback_alias_works
from tests.peers.proc import PeerError, PeerProcess, scratch_dir, tail
from tests.peers.sipmsg import SipText, parse_message

__all__ = ["CallFailed", "Phone", "PhoneError", "PhoneTimeout", "pjsua2_available"]

ROOT = Path(__file__).resolve().parents[2]  # the repository: `tests` is importable from here
_MARGIN = 5.0  # seconds beyond a command's own timeout before the agent is declared hung


class PhoneError(PeerError):
    """The phone agent failed or answered with an error; `kind` says which."""

    def __init__(self, message: str, kind: str = "error", **extra: Any) -> None:
        super().__init__(message)
        self.kind = kind
        self.extra = extra


class PhoneTimeout(PhoneError, TimeoutError):
    """The awaited SIP event did not happen in time (the phone itself is fine)."""


class CallFailed(PhoneError):
    """A call ended before the awaited state; `status` is its last SIP status code."""

    @property
    def status(self) -> int:
        return int(self.extra.get("status", 0))

    @property
    def call(self) -> int | None:
        return self.extra.get("call")


def pjsua2_available() -> bool:
    try:
        import pjsua2  # noqa: F401
    except ImportError:
        return False
    return True


class Phone:
    """One SIP phone (one account, one transport) registering at registrar_host:port.

    transport: "udp", "tcp" or "tls" (tls_ca: the CA file the server is verified against,
    "" = no verification; tls_cert: (cert, key) paths to present a client certificate;
    sips: use sips: URIs instead of sip:...;transport=tls). bind_ip: a loopback address (127.0.0.2 keeps the phones
    apart from servers on 127.0.0.1). local_port 0: any free port. domain: the host part of
    the phone's AOR (default registrar_host:registrar_port). contact_rewrite: pjsua's
    rport-based Contact rewriting, off by default so a NAT stays visible to the server.
    auto_answer: status code sent to incoming calls after `answer_delay` seconds (None:
    ring with 180 and wait for answer()). ring: send 180 Ringing first.
    """

    def __init__(
        self,
        user: str,
        registrar_host: str,
        registrar_port: int,
        transport: str = "udp",
        bind_ip: str = "127.0.0.2",
        local_port: int = 0,
        contact_rewrite: bool = False,
        *,
        domain: str | None = None,
        auto_answer: int | None = 200,
        answer_delay: float = 0.0,
        ring: bool = True,
        workdir: Path | None = None,
        start_timeout: float = 10.0,
        log_level: int = 5,
        tls_ca: str | Path = "",
        tls_cert: tuple[str | Path, str | Path] | None = None,
        sips: bool = False,
    ) -> None:
        if transport not in ("udp", "tcp", "tls"):
            raise ValueError(f"transport must be udp, tcp or tls, not {transport!r}")
        if not bind_ip.startswith("127."):
            raise ValueError(f"tests bind loopback only, not {bind_ip}")
        self.user = user
        self.registrar = (registrar_host, int(registrar_port))
        self.transport = transport
        self.bind_ip = bind_ip
        self.local_port = local_port
        self.domain = domain or f"{registrar_host}:{registrar_port}"
        self.workdir = Path(workdir) if workdir else scratch_dir(f"phone-{user}-")
        self.start_timeout = start_timeout
        self._init_args = {
            "user": user,
            "registrar_host": registrar_host,
            "registrar_port": int(registrar_port),
            "transport": transport,
            "bind_ip": bind_ip,
            "local_port": local_port,
            "contact_rewrite": contact_rewrite,
            "domain": self.domain,
            "auto_answer": auto_answer,
            "answer_delay": answer_delay,
            "ring": ring,
            "log_level": log_level,
            "tls_ca": str(tls_ca),
            "tls_cert": [str(x) for x in tls_cert] if tls_cert else None,
            "sips": sips,
        }
        self.sips = sips
        self.proc: PeerProcess | None = None
        self.local_addr: tuple[str, int] | None = None
        self._lines: queue.Queue[bytes | None] = queue.Queue()
        self._next_id = 0
        self.last_register: dict[str, Any] | None = None  # code, reason, expires

    # -- files -----------------------------------------------------------------------
    @property
    def name(self) -> str:
        return f"phone-{self.user}-{self.transport}"

    @property
    def log_path(self) -> Path:
        """pjsua's own log: every SIP message sent and received."""
        return self.workdir / f"{self.name}.pjsua.log"

    @property
    def agent_log_path(self) -> Path:
        return self.workdir / f"{self.name}.agent.log"

    def log_tail(self, lines: int = 60) -> str:
        return (
            f"--- {self.agent_log_path.name} ---\n{tail(self.agent_log_path, 20)}\n"
            f"--- {self.log_path.name} ---\n{tail(self.log_path, lines)}"
        )

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> Self:
        if self.proc is not None:
            raise PhoneError(f"{self.name}: already started")
        if not pjsua2_available():
            raise PhoneError("the pjsua2 module is not installed (pip install pjsua2-python)")
        if not loopback_alias_works(self.bind_ip):
            raise PhoneError(f"cannot bind {self.bind_ip}: loopback alias missing")
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = PeerProcess(
            self.name,
            [sys.executable, "-m", "tests.peers.phone_agent"],
            self.agent_log_path,
            cwd=ROOT,
            env=env,
            pipes=True,
        )
        self.proc.start()
        assert self.proc.proc is not None and self.proc.proc.stdout is not None
        threading.Thread(
            target=_read_lines, args=(self.proc.proc.stdout, self._lines), daemon=True
        ).start()
        try:
            info = self._cmd(
                "init", self.start_timeout, **self._init_args, log_file=str(self.log_path)
            )
        except BaseException:
            self.stop()
            raise
        host, port = info["local_addr"]
        self.local_addr = (host, int(port))
        return self

    def stop(self, hangup: bool = True) -> None:
        """Hang up open calls (best effort) and end the agent process."""
        if self.proc is None:
            return
        if self.proc.alive():
            try:
                self._cmd("quit", 2.0, hangup=hangup)
            except PhoneError:
                pass
        self.proc.wait(2.0)
        self.proc.stop(grace=1.0)
        self.proc = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- protocol --------------------------------------------------------------------
    def _cmd(self, cmd: str, timeout: float, **args: Any) -> Any:
        if self.proc is None or self.proc.proc is None or self.proc.proc.stdin is None:
            raise PhoneError(f"{self.name}: not started")
        self._next_id += 1
        rid = self._next_id
        line = json.dumps({"id": rid, "cmd": cmd, "args": args | {"timeout": timeout}})
        try:
            self.proc.proc.stdin.write(line.encode() + b"\n")
            self.proc.proc.stdin.flush()
        except (BrokenPipeError, ValueError) as exc:
            raise self._dead(f"cannot send {cmd}: {exc}") from exc
        while True:
            try:
                raw = self._lines.get(timeout=timeout + _MARGIN)
            except queue.Empty:
                self.proc.stop(grace=0.5)
                raise PhoneError(
                    f"{self.name}: agent hung on {cmd} (> {timeout + _MARGIN:.0f}s), killed\n"
                    + self.log_tail()
                ) from None
            if raw is None:
                raise self._dead(f"agent exited during {cmd}")
            reply = json.loads(raw)
            if reply.get("id") == rid:
                break
        if reply["ok"]:
            return reply.get("result")
        kind = reply.pop("kind", "error")
        message = f"{self.name}: {cmd}: {reply.pop('error', '?')}"
        extra = {k: v for k, v in reply.items() if k not in ("id", "ok")}
        cls = {"timeout": PhoneTimeout, "call_failed": CallFailed}.get(kind, PhoneError)
        raise cls(message, kind, **extra)

    def _dead(self, what: str) -> PhoneError:
        assert self.proc is not None
        code = self.proc.wait(1.0)
        return PhoneError(f"{self.name}: {what} (exit {code})\n" + self.log_tail())

    # -- registration ----------------------------------------------------------------
    def register(self, expires: int = 300, timeout: float = 5.0) -> int:
        """Send REGISTER and wait for the final answer; returns its status code
        (408 from pjsua when nothing answered)."""
        result = self._cmd("register", timeout, expires=expires)
        self.last_register = result
        return int(result["code"])

    def unregister(self, timeout: float = 5.0) -> int:
        """REGISTER with Expires 0; returns the status code."""
        return int(self._cmd("unregister", timeout)["code"])

    def last_register_response(self) -> SipText | None:
        """The last response to REGISTER as received (headers, e.g. X-System, Path)."""
        raw = self._cmd("last_register_response", 2.0)
        return parse_message(raw) if raw else None

    def last_register_response_headers(self) -> dict[str, list[str]]:
        msg = self.last_register_response()
        return msg.headers if msg else {}

    # -- calls -----------------------------------------------------------------------
    def uri(self, user: str) -> str:
        """sip:user@<registrar or NAT address>[;transport=tcp|tls]: where this phone's calls go."""
        host, port = self.registrar
        if self.sips:
            return f"sips:{user}@{host}:{port}"
        return f"sip:{user}@{host}:{port}" + (f";transport={self.transport}" if self.transport != "udp" else "")

    def call(
        self,
        target: str,
        timeout: float = 10.0,
        *,
        wait: bool = True,
        headers: dict[str, str] | None = None,
    ) -> int:
        """Call `target` (a user or number, sent to the registrar; or a full sip: URI).

        Waits until the call is answered (CONFIRMED) and returns its call id; raises
        CallFailed (with .status) when it is rejected. wait=False returns at once.
        """
        return int(self._cmd("call", timeout, target=target, wait=wait, headers=headers)["call"])

    def wait_incoming_call(self, timeout: float = 10.0) -> int:
        """The next incoming call's id (answered automatically when auto_answer is set)."""
        return int(self._cmd("wait_incoming_call", timeout)["call"])

    def answer(self, call: int, code: int = 200, timeout: float = 5.0) -> dict[str, Any]:
        """Answer (2xx: waits for the ACK) or reject (>= 300) a ringing incoming call."""
        result: dict[str, Any] = self._cmd("answer", timeout, call=call, code=code)
        return result

    def reinvite(self, call: int, timeout: float = 5.0) -> int:
        """Send a re-INVITE in the call; returns the final status code."""
        return int(self._cmd("reinvite", timeout, call=call))

    def hangup(self, call: int, code: int | None = None, timeout: float = 5.0) -> int | None:
        """End the call (BYE, CANCEL or a rejection `code`), wait until it is disconnected.

        Returns the status code answering our BYE when one was sent, else None.
        """
        result = self._cmd("hangup", timeout, call=call, code=code)
        return None if result["bye_status"] is None else int(result["bye_status"])

    def wait_call_state(self, call: int, state: str = "DISCONNECTED", timeout: float = 10) -> str:
        """Wait for NULL/CALLING/INCOMING/EARLY/CONNECTING/CONFIRMED/DISCONNECTED.

        Raises CallFailed when the call is disconnected first."""
        return str(self._cmd("wait_call_state", timeout, call=call, state=state)["state"])

    def call_info(self, call: int) -> dict[str, Any]:
        """state, last_status, last_reason, sip_call_id, remote_uri, remote_contact,
        local_contact, uac_finals ({method: [final codes of our requests]})."""
        result: dict[str, Any] = self._cmd("call_info", 2.0, call=call)
        return result

    def received_messages(self, call: int) -> list[SipText]:
        """Every SIP message this phone received in the call, oldest first."""
        return [parse_message(m) for m in self._cmd("messages", 2.0, call=call)]

    def received_invite(self, call: int) -> SipText:
        """The initial INVITE of an incoming call, as received."""
        for msg in self.received_messages(call):
            if msg.method == "INVITE":
                return msg
        raise PhoneError(f"{self.name}: call {call} has no received INVITE")

    def received_headers(self, call: int) -> dict[str, list[str]]:
        """Headers of the incoming INVITE: {lowercase name: [values]}."""
        return self.received_invite(call).headers

    def __repr__(self) -> str:
        return f"Phone({self.user!r} {self.transport} {self.local_addr} -> {self.registrar})"


def _read_lines(stream: IO[bytes], out: queue.Queue[bytes | None]) -> None:
    try:
        for line in stream:
            out.put(line)
    except (OSError, ValueError):
        pass
    out.put(None)
