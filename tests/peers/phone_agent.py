"""One pjsua2 phone in its own process, driven by JSON lines on stdin/stdout.

Started by tests/peers/phone.py (`python -m tests.peers.phone_agent`); not imported by
tests. pjsua2 is a C library with its own threads and a habit of aborting on misuse, so it
lives here, away from pytest. The first line is {"cmd": "init", "args": {...}}; every
request {"id": N, "cmd": ..., "args": {...}} gets exactly one answer
{"id": N, "ok": true, "result": ...} or {"id": N, "ok": false, "kind": ..., "error": ...}.

Threading: uaConfig.threadCnt = 0, so pjsip has no worker thread; this loop calls
libHandleEvents() and every callback runs here, between commands or inside a command's
bounded wait. The protocol uses a private copy of fd 1; fd 1 itself is pointed at stderr so
that anything the C library prints cannot corrupt it.
"""

from __future__ import annotations

import json
import os
import re
import select
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import pjsua2 as pj

STATES = {
    pj.PJSIP_INV_STATE_NULL: "NULL",
    pj.PJSIP_INV_STATE_CALLING: "CALLING",
    pj.PJSIP_INV_STATE_INCOMING: "INCOMING",
    pj.PJSIP_INV_STATE_EARLY: "EARLY",
    pj.PJSIP_INV_STATE_CONNECTING: "CONNECTING",
    pj.PJSIP_INV_STATE_CONFIRMED: "CONFIRMED",
    pj.PJSIP_INV_STATE_DISCONNECTED: "DISCONNECTED",
}


class AgentError(Exception):
    kind = "error"

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.extra = extra


class AgentTimeout(AgentError):
    kind = "timeout"


class CallFailed(AgentError):
    kind = "call_failed"


def log(msg: str) -> None:
    sys.stderr.write(f"{time.strftime('%H:%M:%S')} agent: {msg}\n")
    sys.stderr.flush()


def guarded(fn: Callable[..., None]) -> Callable[..., None]:
    """An exception escaping a SWIG director callback can abort the process: log it."""

    def wrapper(*args: Any) -> None:
        try:
            fn(*args)
        except Exception:  # noqa: BLE001 (anything: the C caller cannot take it)
            log("callback failed:\n" + traceback.format_exc())

    return wrapper


_MSG_LOG = re.compile(r"\b(RX|TX) \d+ bytes (?:Request|Response) msg .*?:\r?\n")
_CALL_ID = re.compile(r"^(?:Call-ID|i)[ \t]*:[ \t]*(\S+)", re.IGNORECASE | re.MULTILINE)
_CSEQ = re.compile(r"^CSeq[ \t]*:[ \t]*\d+[ \t]+(\w+)", re.IGNORECASE | re.MULTILINE)


class LogCapture(pj.LogWriter):  # type: ignore[misc]
    """Receives pjsua's log (any thread; the binding takes the GIL): writes it to the log
    file, flushed, and keeps every SIP message received, as pjsua's message log shows it."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.file = open(path, "a", buffering=1)  # noqa: SIM115 (lives with the process)
        self.received: list[str] = []

    def write(self, entry: pj.LogEntry) -> None:
        try:
            text = entry.msg
            self.file.write(text if text.endswith("\n") else text + "\n")
            m = _MSG_LOG.search(text)
            if m and m.group(1) == "RX":
                body = text[m.end() :]
                body = body.split("\n--end msg--", 1)[0]
                self.received.append(body.strip("\r\n") + "\r\n")
        except Exception as exc:  # noqa: BLE001 (never into the C library's log path)
            sys.stderr.write(f"log capture failed: {exc!r}\n")

    def for_call(self, sip_call_id: str, start: int = 0) -> list[str]:
        return [
            raw
            for raw in self.received[start:]
            if (m := _CALL_ID.search(raw)) and m.group(1) == sip_call_id
        ]


class PhoneCall(pj.Call):  # type: ignore[misc]
    def __init__(self, agent: Agent, acc: pj.Account, call_id: int = pj.PJSUA_INVALID_ID):
        super().__init__(acc, call_id)
        self.agent = agent
        self.num = agent.next_call_num()
        self.state = "NULL"
        self.last_status = 0
        self.last_reason = ""
        self.sip_call_id = ""
        self.remote_uri = ""
        self.remote_contact = ""
        self.local_contact = ""
        self.uac_finals: dict[str, list[int]] = {}  # method -> final codes of our requests

    def snapshot(self) -> dict[str, Any]:
        return {
            "call": self.num,
            "state": self.state,
            "last_status": self.last_status,
            "last_reason": self.last_reason,
            "sip_call_id": self.sip_call_id,
            "remote_uri": self.remote_uri,
            "remote_contact": self.remote_contact,
            "local_contact": self.local_contact,
        }

    @guarded
    def onCallState(self, prm: pj.OnCallStateParam) -> None:
        ci = self.getInfo()
        self.state = STATES.get(ci.state, str(ci.state))
        self.last_status = int(ci.lastStatusCode)
        self.last_reason = ci.lastReason
        self.sip_call_id = ci.callIdString
        self.remote_uri = ci.remoteUri
        self.remote_contact = ci.remoteContact
        self.local_contact = ci.localContact
        log(f"call {self.num} state {self.state} last={self.last_status}")

    @guarded
    def onCallTsxState(self, prm: pj.OnCallTsxStateParam) -> None:
        e = prm.e
        if e.type != pj.PJSIP_EVENT_TSX_STATE:
            return
        ts = e.body.tsxState
        tsx = ts.tsx
        if (
            tsx.role == pj.PJSIP_ROLE_UAC
            and tsx.statusCode >= 200
            and ts.type
            in (
                pj.PJSIP_EVENT_RX_MSG,
                pj.PJSIP_EVENT_TIMER,
                pj.PJSIP_EVENT_TRANSPORT_ERROR,
            )
        ):
            finals = self.uac_finals.setdefault(tsx.method, [])
            finals.append(int(tsx.statusCode))

    @guarded
    def onCallMediaState(self, prm: pj.OnCallMediaStateParam) -> None:
        pass  # null audio device: nothing to connect


class PhoneAccount(pj.Account):  # type: ignore[misc]
    def __init__(self, agent: Agent) -> None:
        super().__init__()
        self.agent = agent
        self.reg_events: list[dict[str, Any]] = []

    @guarded
    def onRegState(self, prm: pj.OnRegStateParam) -> None:
        raw = prm.rdata.wholeMsg if prm.rdata is not None else ""
        self.reg_events.append(
            {
                "code": int(prm.code),
                "reason": prm.reason,
                "expires": int(prm.expiration),
                "response": raw,
            }
        )
        log(f"reg state {prm.code} {prm.reason} expires={prm.expiration}")

    @guarded
    def onIncomingCall(self, prm: pj.OnIncomingCallParam) -> None:
        call = PhoneCall(self.agent, self, prm.callId)
        call.sip_call_id = call.getInfo().callIdString
        self.agent.register_call(call)
        self.agent.on_incoming(call)


class Agent:
    def __init__(self, out: Any) -> None:
        self.out = out
        self.ep: pj.Endpoint | None = None
        self.acc: PhoneAccount | None = None
        self.acc_cfg: pj.AccountConfig | None = None
        self.calls: dict[int, PhoneCall] = {}
        self.incoming: list[int] = []  # not yet handed out by wait_incoming_call
        self.pending_answers: list[tuple[float, int, int]] = []  # (when, call, code)
        self._num = 0
        self.args: dict[str, Any] = {}
        self.transport_id = -1
        self.log: LogCapture | None = None
        self.local = ("", 0)

    def next_call_num(self) -> int:
        self._num += 1
        return self._num

    def register_call(self, call: PhoneCall) -> None:
        self.calls[call.num] = call  # keep a reference: GC of the wrapper breaks pjsua2

    # -- event pump ------------------------------------------------------------------
    def pump(self, ms: int = 10) -> None:
        assert self.ep is not None
        self.ep.libHandleEvents(ms)
        now = time.monotonic()
        due = [a for a in self.pending_answers if a[0] <= now]
        for item in due:
            self.pending_answers.remove(item)
            self._answer(item[1], item[2])

    def wait_for(self, cond: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = cond()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AgentTimeout(f"timed out after {timeout:.1f}s waiting for {what}")
            self.pump(10)

    # -- commands --------------------------------------------------------------------
    def cmd_init(self, a: dict[str, Any]) -> dict[str, Any]:
        self.args = a
        ep = self.ep = pj.Endpoint()
        ep.libCreate()
        cfg = pj.EpConfig()
        cfg.uaConfig.threadCnt = 0
        cfg.uaConfig.mainThreadOnly = False
        cfg.uaConfig.maxCalls = 16
        cfg.uaConfig.userAgent = f"dsbc-test-phone-{a['user']}"
        cfg.logConfig.level = int(a.get("log_level", 5))
        cfg.logConfig.consoleLevel = cfg.logConfig.level  # the "console" is our writer
        cfg.logConfig.msgLogging = 1
        self.log = LogCapture(a["log_file"])
        cfg.logConfig.writer = self.log
        cfg.medConfig.noVad = True
        ep.libInit(cfg)

        tcfg = pj.TransportConfig()
        tcfg.boundAddress = a["bind_ip"]
        tcfg.publicAddress = a["bind_ip"]
        tcfg.port = int(a.get("local_port") or 0)
        kind = {"tcp": pj.PJSIP_TRANSPORT_TCP, "tls": pj.PJSIP_TRANSPORT_TLS}.get(a["transport"], pj.PJSIP_TRANSPORT_UDP)
        if a["transport"] == "tls":
            tls = tcfg.tlsConfig
            if a.get("tls_ca"):
                tls.CaListFile = a["tls_ca"]
                tls.verifyServer = True
            if a.get("tls_cert"):
                tls.certFile, tls.privKeyFile = a["tls_cert"]
        self.transport_id = ep.transportCreate(kind, tcfg)
        ep.libStart()
        ep.audDevManager().setNullDev()

        info = ep.transportGetInfo(self.transport_id)
        host, _, port = info.localName.rpartition(":")
        self.local = (host, int(port))

        acfg = self.acc_cfg = pj.AccountConfig()
        acfg.idUri = f"{'sips' if a.get('sips') else 'sip'}:{a['user']}@{a['domain']}"
        acfg.regConfig.registrarUri = self.uri("")
        acfg.regConfig.registerOnAdd = False
        acfg.regConfig.timeoutSec = 300
        acfg.regConfig.retryIntervalSec = 0  # no automatic retry: tests decide
        acfg.regConfig.firstRetryIntervalSec = 0
        acfg.regConfig.dropCallsOnFail = False
        acfg.regConfig.unregWaitMsec = 500
        acfg.sipConfig.transportId = self.transport_id
        rewrite = 1 if a.get("contact_rewrite") else 0
        acfg.natConfig.contactRewriteUse = rewrite
        acfg.natConfig.viaRewriteUse = rewrite
        acfg.natConfig.sdpNatRewriteUse = 0
        acfg.natConfig.sipOutboundUse = 0
        acfg.natConfig.udpKaIntervalSec = 0
        acfg.natConfig.iceEnabled = False
        acfg.natConfig.turnEnabled = False
        acfg.mediaConfig.transportConfig.boundAddress = a["bind_ip"]
        acfg.mediaConfig.transportConfig.publicAddress = a["bind_ip"]
        acfg.callConfig.timerUse = pj.PJSUA_SIP_TIMER_INACTIVE
        self.acc = PhoneAccount(self)
        self.acc.create(acfg, True)
        return self.cmd_info({})

    def uri(self, user: str) -> str:
        """sip:user@registrar (the address this phone sends to), with its transport."""
        a = self.args
        target = f"sip:{user + '@' if user else ''}{a['registrar_host']}:{a['registrar_port']}"
        if a.get("sips"):
            return "sips" + target[3:]
        return target + (f";transport={a['transport']}" if a["transport"] != "udp" else "")

    def cmd_info(self, a: dict[str, Any]) -> dict[str, Any]:
        return {"local_addr": list(self.local), "transport": self.args["transport"]}

    def _reg_wait(self, before: int, timeout: float) -> dict[str, Any]:
        assert self.acc is not None
        acc = self.acc
        event: dict[str, Any] = self.wait_for(
            lambda: next((e for e in acc.reg_events[before:] if e["code"] >= 200), None),
            timeout,
            "the final answer to REGISTER",
        )
        return {k: event[k] for k in ("code", "reason", "expires")}

    def cmd_register(self, a: dict[str, Any]) -> dict[str, Any]:
        assert self.acc is not None and self.acc_cfg is not None
        before = len(self.acc.reg_events)
        expires = int(a.get("expires", 300))
        if expires != self.acc_cfg.regConfig.timeoutSec:
            self.acc_cfg.regConfig.timeoutSec = expires
            self.acc_cfg.regConfig.disableRegOnModify = True
            self.acc.modify(self.acc_cfg)
        self.acc.setRegistration(True)
        return self._reg_wait(before, float(a.get("timeout", 5.0)))

    def cmd_unregister(self, a: dict[str, Any]) -> dict[str, Any]:
        assert self.acc is not None
        before = len(self.acc.reg_events)
        self.acc.setRegistration(False)
        return self._reg_wait(before, float(a.get("timeout", 5.0)))

    def cmd_last_register_response(self, a: dict[str, Any]) -> str:
        assert self.acc is not None
        for e in reversed(self.acc.reg_events):
            if e["response"]:
                return str(e["response"])
        return ""

    def cmd_call(self, a: dict[str, Any]) -> dict[str, Any]:
        assert self.acc is not None
        target = a["target"]
        uri = target if target.startswith(("sip:", "sips:", "tel:")) else self.uri(target)
        call = PhoneCall(self, self.acc)
        self.register_call(call)
        prm = pj.CallOpParam(True)
        for name, value in (a.get("headers") or {}).items():
            h = pj.SipHeader()
            h.hName = name
            h.hValue = value
            prm.txOption.headers.append(h)
        call.makeCall(uri, prm)
        if not a.get("wait", True):
            return call.snapshot()
        self.wait_for(
            lambda: call.state in ("CONFIRMED", "DISCONNECTED"),
            float(a.get("timeout", 10.0)),
            f"call to {uri} to be answered",
        )
        if call.state != "CONFIRMED":
            raise CallFailed(
                f"call to {uri} failed: {call.last_status} {call.last_reason}",
                call=call.num,
                status=call.last_status,
            )
        return call.snapshot()

    def on_incoming(self, call: PhoneCall) -> None:
        self.incoming.append(call.num)
        a = self.args
        if a.get("ring", True):
            self._answer(call.num, 180)
        code = a.get("auto_answer")
        if code:
            when = time.monotonic() + float(a.get("answer_delay", 0.0))
            self.pending_answers.append((when, call.num, int(code)))

    def _answer(self, num: int, code: int) -> None:
        call = self.calls[num]
        if call.state in ("DISCONNECTED", "CONFIRMED"):
            return
        prm = pj.CallOpParam(True)
        prm.statusCode = code
        if code >= 300:
            call.hangup(prm)
        else:
            call.answer(prm)

    def cmd_wait_incoming_call(self, a: dict[str, Any]) -> dict[str, Any]:
        self.wait_for(lambda: self.incoming, float(a.get("timeout", 10.0)), "an incoming call")
        num = self.incoming.pop(0)
        return self.calls[num].snapshot()

    def _call(self, a: dict[str, Any]) -> PhoneCall:
        try:
            return self.calls[int(a["call"])]
        except (KeyError, ValueError) as exc:
            raise AgentError(f"no call {a.get('call')!r}") from exc

    def cmd_answer(self, a: dict[str, Any]) -> dict[str, Any]:
        call = self._call(a)
        self._answer(call.num, int(a.get("code", 200)))
        if int(a.get("code", 200)) == 200:
            self.wait_for(
                lambda: call.state in ("CONFIRMED", "DISCONNECTED"),
                float(a.get("timeout", 5.0)),
                "the ACK",
            )
        return call.snapshot()

    def _uac(self, call: PhoneCall, method: str, start: Callable[[], None], timeout: float) -> int:
        before = len(call.uac_finals.get(method, []))
        start()
        codes: list[int] = self.wait_for(
            lambda: call.uac_finals.get(method, [])[before:], timeout, f"the answer to {method}"
        )
        return codes[0]

    def cmd_reinvite(self, a: dict[str, Any]) -> int:
        call = self._call(a)
        prm = pj.CallOpParam(True)
        prm.opt.flag = pj.PJSUA_CALL_UNHOLD
        return self._uac(call, "INVITE", lambda: call.reinvite(prm), float(a.get("timeout", 5)))

    def cmd_hangup(self, a: dict[str, Any]) -> dict[str, Any]:
        call = self._call(a)
        timeout = float(a.get("timeout", 5.0))
        if call.state == "DISCONNECTED":
            return call.snapshot() | {"bye_status": None}
        assert self.log is not None
        sends_bye = call.state == "CONFIRMED"
        seen = len(self.log.received)
        prm = pj.CallOpParam(True)
        if a.get("code"):
            prm.statusCode = int(a["code"])
        call.hangup(prm)
        self.wait_for(lambda: call.state == "DISCONNECTED", timeout, "the call to end")
        bye_status = None
        if sends_bye:
            # pjsua reports DISCONNECTED as soon as it sends BYE and stops calling back for
            # that call: take the answer to BYE from the message log.
            def bye_answer() -> int | None:
                for raw in self.log.for_call(call.sip_call_id, seen) if self.log else []:
                    cseq = _CSEQ.search(raw)
                    if raw.startswith("SIP/2.0 ") and cseq and cseq.group(1) == "BYE":
                        code = int(raw.split()[1])
                        if code >= 200:
                            return code
                return None

            bye_status = self.wait_for(bye_answer, min(timeout, 5.0), "the answer to BYE")
        return call.snapshot() | {"bye_status": bye_status}

    def cmd_wait_call_state(self, a: dict[str, Any]) -> dict[str, Any]:
        call = self._call(a)
        wanted = a["state"].upper()
        if wanted not in STATES.values():
            raise AgentError(f"unknown call state {wanted}")
        self.wait_for(
            lambda: call.state == wanted or call.state == "DISCONNECTED",
            float(a.get("timeout", 10.0)),
            f"call {call.num} to reach {wanted} (now {call.state})",
        )
        if call.state != wanted:
            raise CallFailed(
                f"call {call.num} ended ({call.last_status} {call.last_reason}) before {wanted}",
                call=call.num,
                status=call.last_status,
            )
        return call.snapshot()

    def cmd_call_info(self, a: dict[str, Any]) -> dict[str, Any]:
        call = self._call(a)
        return call.snapshot() | {"uac_finals": call.uac_finals}

    def cmd_messages(self, a: dict[str, Any]) -> list[str]:
        assert self.log is not None
        return self.log.for_call(self._call(a).sip_call_id)

    def cmd_quit(self, a: dict[str, Any]) -> None:
        """Hang up calls still open (BYE / CANCEL / 603), give them a moment to leave."""
        live = [c for c in self.calls.values() if c.state not in ("NULL", "DISCONNECTED")]
        if self.ep is not None and live and a.get("hangup", True):
            self.ep.hangupAllCalls()
            try:
                self.wait_for(lambda: all(c.state == "DISCONNECTED" for c in live), 0.5, "")
            except AgentTimeout:
                pass  # quitting anyway

    # -- protocol --------------------------------------------------------------------
    def handle(self, line: str) -> bool:
        try:
            req = json.loads(line)
        except ValueError:
            log(f"bad request line: {line!r}")
            return True
        rid = req.get("id")
        cmd = req.get("cmd", "")
        fn = getattr(self, f"cmd_{cmd}", None)
        try:
            if fn is None:
                raise AgentError(f"unknown command {cmd!r}")
            if cmd != "init" and self.ep is None:
                raise AgentError("not initialised")
            reply: dict[str, Any] = {"id": rid, "ok": True, "result": fn(req.get("args") or {})}
        except AgentError as exc:
            reply = {"id": rid, "ok": False, "kind": exc.kind, "error": str(exc), **exc.extra}
        except pj.Error as exc:
            reply = {"id": rid, "ok": False, "kind": "pjsua", "error": exc.info()}
        except Exception as exc:  # noqa: BLE001 (answer the test, keep the phone alive)
            log(traceback.format_exc())
            reply = {"id": rid, "ok": False, "kind": "error", "error": repr(exc)}
        self.out.write(json.dumps(reply) + "\n")
        self.out.flush()
        return bool(cmd != "quit")

    def run(self) -> None:
        buf = b""
        while True:
            if self.ep is not None:
                self.pump(10)
                ready = select.select([0], [], [], 0)[0]
            else:
                ready = select.select([0], [], [], 0.05)[0]
            if not ready:
                continue
            chunk = os.read(0, 65536)
            if not chunk:  # the test process went away
                log("stdin closed, exiting")
                return
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.strip() and not self.handle(line.decode()):
                    return


def main() -> None:
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints from C code go to the log, not into the protocol
    sys.stdout = sys.stderr
    Agent(out).run()
    out.flush()
    # Skip libDestroy and interpreter teardown: pjsua2 wrappers may crash in destructors
    # and libDestroy waits up to a second for transactions; the OS frees everything.
    os._exit(0)


if __name__ == "__main__":
    main()
