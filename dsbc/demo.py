"""`dsbc demo`: dsbc plus two emulated systems on loopback, seeded with sample customers.

The source system is "MR100" and the target "MR115"; each has a SIP registrar and call
responder (``dsbc.emulator.sip_system``), a PortaBilling-style API with self-care pages
(``dsbc.emulator.billing``) and a RADIUS server (``dsbc.emulator.radius_server``).  dsbc
runs as ``dsbc run`` in a child process on a config written to the demo directory, so
everything the demo prints (``dsbc where``, ``dsbc migrate`` ...) works from another
terminal.  ``--check`` sends one request of each kind through dsbc, prints where each
went, migrates a customer and shows the next request land on the target.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .cli import FiniteFloat

HOST = "127.0.0.1"
RADIUS_SECRET_CLIENT = "demo-nas-secret"

#: a call from the account given to sipp with -s ([service]) to erin's DID, hung up at once
UAC_SCENARIO = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="dsbc demo: a call from an account">
  <send retrans="500">
    <![CDATA[
INVITE sip:15550105@[remote_ip]:[remote_port] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch];rport
From: <sip:[service]@[local_ip]>;tag=[pid]SIPpTag00[call_number]
To: <sip:15550105@[remote_ip]:[remote_port]>
Call-ID: [call_id]
CSeq: 1 INVITE
Contact: <sip:[service]@[local_ip]:[local_port]>
Max-Forwards: 70
Content-Type: application/sdp
Content-Length: [len]

v=0
o=user1 53655765 2353687637 IN IP[local_ip_type] [local_ip]
s=-
c=IN IP[media_ip_type] [media_ip]
t=0 0
m=audio [media_port] RTP/AVP 0
a=rtpmap:0 PCMU/8000
    ]]>
  </send>
  <recv response="100" optional="true"/>
  <recv response="180" optional="true"/>
  <recv response="183" optional="true"/>
  <recv response="200" rtd="true" rrs="true"/>
  <send>
    <![CDATA[
ACK [next_url] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch];rport
[routes]
From: <sip:[service]@[local_ip]>;tag=[pid]SIPpTag00[call_number]
[last_To:]
Call-ID: [call_id]
CSeq: 1 ACK
Max-Forwards: 70
Content-Length: 0

    ]]>
  </send>
  <send retrans="500">
    <![CDATA[
BYE [next_url] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch];rport
[routes]
From: <sip:[service]@[local_ip]>;tag=[pid]SIPpTag00[call_number]
[last_To:]
Call-ID: [call_id]
CSeq: 2 BYE
Max-Forwards: 70
Content-Length: 0

    ]]>
  </send>
  <recv response="200" crlf="true"/>
</scenario>
"""


def _free(preferred: int, taken: set[int]) -> int:
    """``preferred`` if free (for UDP and TCP alike) and not `taken` by another of the demo's
    listeners, else a free port that is not either; added to `taken`.  (Each probe is closed
    before the next: without `taken`, --sip-port 8081 and the control API's 8081, or two
    ports the kernel handed out twice, were given to two listeners and dsbc did not start.)"""
    for port in (preferred, *[0] * 20):
        if port in taken:
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                t.bind((HOST, port))
                u.bind((HOST, t.getsockname()[1]))
                found = int(t.getsockname()[1])
        except OSError:
            continue
        if found not in taken:
            taken.add(found)
            return found
    raise OSError("no free port on 127.0.0.1")


class Demo:
    def __init__(self, workdir: Path, sip_port: int, api_port: int, temporary: bool = False) -> None:
        self.workdir = workdir
        self.temporary = temporary  # made by the demo: removed when it ends well
        taken: set[int] = set()
        self.ports = {
            "sip": _free(sip_port, taken),
            "api": _free(api_port, taken),
            "radius": _free(1812, taken),
            "control": _free(8081, taken),
        }
        self.ports["radius_acct"] = _free(self.ports["radius"] + 1, taken)
        self.handles: list[Any] = []
        self.systems: dict[str, dict[str, Any]] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.config_path = workdir / "dsbc.toml"
        self.db = workdir / "location.db"

    async def start_systems(self) -> None:
        from .emulator.billing import sample_rows, start_billing_emulator
        from .emulator.radius_server import start_radius_emulator
        from .emulator.sip_system import SipSystem

        rows = sample_rows()
        dids = {}
        for r in rows:
            ids = dict(i.split(":", 1) for i in r["identities"])
            dids[ids["did"]] = ids["account"]
        for system, name, secret in (("source", "MR100", "mr100-secret"), ("target", "MR115", "mr115-secret")):
            # peer: a call for a customer of the other system goes through dsbc to it
            sip = SipSystem(name, HOST, 0, ("udp", "tcp"), dids=dids, answer_all=True, peer=(HOST, self.ports["sip"]))
            await sip.start()
            billing = await start_billing_emulator(name, HOST, 0, rows, system=system)
            radius = await start_radius_emulator(name, HOST, 0, 0, secret)
            self.handles += [sip, billing, radius]
            self.systems[system] = {"name": name, "sip": sip, "billing": billing, "radius": radius, "secret": secret}

    def write_sipp_scenario(self) -> None:
        """sipp's built-in uac calls from user "sipp", an unknown caller: this one calls
        from the account given with -s (to a demo DID), as a phone of that account would."""
        (self.workdir / "uac.xml").write_text(UAC_SCENARIO)

    def write_config(self) -> None:
        s, t = self.systems["source"], self.systems["target"]

        def block(sys_: dict[str, Any]) -> str:
            r = sys_["radius"]
            return (
                f'name = "{sys_["name"]}"\n'
                f'sip = ["udp:{HOST}:{sys_["sip"].port}"]\n'
                f'api = "{sys_["billing"].url}"\n'
                f'radius = ["{r.auth_addr[0]}:{r.auth_addr[1]}"]\n'
                f'radius_acct = ["{r.acct_addr[0]}:{r.acct_addr[1]}"]\n'
                f'radius_secret = "{sys_["secret"]}"\n'
            )

        p = self.ports
        self.config_path.write_text(
            f"""# written by `dsbc demo`; see deploy/dsbc.example.toml for every key
[store]
url = "sqlite:///{self.db}"
unknown = "source"
poll_interval = 0.2

[systems.source]
{block(s)}
[systems.target]
{block(t)}
[sip]
listen = ["udp:{HOST}:{p['sip']}", "tcp:{HOST}:{p['sip']}"]
workers = 1
options_interval = 2.0

[api]
listen = ["{HOST}:{p['api']}"]

[[api.vhosts]]
host = "*"
realm = "customer"
source = "{s['billing'].url}"
target = "{t['billing'].url}"

[[api.vhosts]]
host = "admin.localhost"
realm = "admin"
source = "{s['billing'].url}"
target = "{t['billing'].url}"

[[api.vhosts]]
host = "prov.localhost"
realm = "cpe"
source = "{s['billing'].url}"
target = "{t['billing'].url}"

[radius]
enabled = true
auth_listen = "{HOST}:{p['radius']}"
acct_listen = "{HOST}:{p['radius_acct']}"

[[radius.clients]]
address = "127.0.0.0/8"
secret = "{RADIUS_SECRET_CLIENT}"

[control]
listen = "{HOST}:{p['control']}"
token = "demo-token"
"""
        )

    def seed_store(self) -> None:
        from .emulator.billing import sample_rows
        from .store import open_store

        store = open_store(f"sqlite:///{self.db}", "source", create=True)
        try:
            store.import_rows(sample_rows())
        finally:
            store.close()

    def start_dsbc(self) -> None:
        env = dict(os.environ)
        env["DSBC_RUN_DIR"] = str(self.workdir / "run")
        # a session of its own: a Ctrl-C in the terminal reaches the demo, which stops dsbc
        # (SIGTERM, a drain); sent to dsbc too, it interrupted its start with a traceback and
        # the demo said "dsbc exited; see dsbc.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dsbc.cli", "-c", str(self.config_path), "run"],
            env=env,
            stdout=open(self.workdir / "dsbc.log", "ab"),  # noqa: SIM115 - lives as long as dsbc
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    async def wait_ready(self, stop: asyncio.Event | None = None, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if stop is not None and stop.is_set():
                return  # Ctrl-C while starting: the caller stops
            if self.proc is not None and self.proc.poll() is not None:
                # a Ctrl-C that came while dsbc was being started can reach it too (before its
                # setsid: the signal waits, blocked, and kills it silently): the demo's own
                # handler runs on the loop, so let it run before calling this a failure
                await asyncio.sleep(0.2)
                if stop is not None and stop.is_set():
                    return
                raise click.ClickException(f"dsbc exited; see {self.workdir / 'dsbc.log'}")
            if await sip_options(HOST, self.ports["sip"]):
                return
            await asyncio.sleep(0.2)
        raise click.ClickException(f"dsbc did not start; see {self.workdir / 'dsbc.log'}")

    async def sync_billing(self) -> None:
        """Keep the emulated billing systems in step with migrations made with the CLI."""
        from .emulator.billing import sync_systems
        from .store import open_store

        store = open_store(f"sqlite:///{self.db}", "source")
        try:
            while True:
                changed = store.refresh()
                if changed:
                    found = [(c, store.customer(c)) for c in changed]
                    placement = [(c, rec.system) for c, rec in found if rec is not None and rec.state == "active"]
                    copying = [c for c, rec in found
                               if rec is not None and rec.state == "locked" and rec.system == "source"]
                    sync_systems(self.systems["source"]["billing"], self.systems["target"]["billing"],
                                 placement, copying)
                await asyncio.sleep(0.05)  # as store.poll_interval: the dispatchers see it no sooner
        finally:
            store.close()

    def _files_line(self) -> str:
        where = f"Config, store and logs: {self.workdir}"
        if self.temporary:
            return where + " (removed when the demo stops; --dir DIR keeps them)"
        return where

    def banner(self, stops: str = "Ctrl-C stops it") -> str:
        p = self.ports
        cfg = self.config_path
        s, t = self.systems["source"], self.systems["target"]
        return f"""
dsbc demo is running ({stops}). Everything is on {HOST}.

  dsbc SIP          udp/tcp {HOST}:{p['sip']}     (phones and carriers use this one address)
  dsbc API          http://{HOST}:{p['api']}/     (self-care pages and /rest/<Service>/<method>)
  dsbc RADIUS       {HOST}:{p['radius']} auth, {p['radius_acct']} acct, secret {RADIUS_SECRET_CLIENT}
  control API       http://{HOST}:{p['control']}/metrics   (token demo-token)

  source MR100      SIP {HOST}:{s['sip'].port}, API {s['billing'].url}
  target MR115      SIP {HOST}:{t['sip'].port}, API {t['billing'].url}

{self._files_line()}

Sample customers (password "secret"): alice, bob, carol on the source; dave, erin on the target.
  alice: account 100001, DID 15550101, cpe 0004f2a1b2c1 ... erin: account 100005, DID 15550105

Try, in another terminal:
  dsbc -c {cfg} where account:100001
  sipp -sf {self.workdir / 'uac.xml'} -s 100001 -m 1 {HOST}:{p['sip']}   # a call from account 100001
  curl -s -H 'Host: prov.localhost' http://{HOST}:{p['api']}/prov/0004f2a1b2c1.cfg   # alice's phone's configuration
  echo "User-Name=100001,User-Password=x" | radclient -x {HOST}:{p['radius']} auth {RADIUS_SECRET_CLIENT}
  curl -s -d 'params={{"login":"alice","password":"secret"}}' http://{HOST}:{p['api']}/rest/Session/login
  curl -s -H 'Host: admin.localhost' -d 'params={{"login":"admin","password":"admin"}}' http://{HOST}:{p['api']}/rest/Session/login
  curl -s -H 'Host: admin.localhost' -d 'auth_info={{"session_id":"<from the login>"}}' http://{HOST}:{p['api']}/rest/Customer/get_customer_list
                                                          # the admin realm: one list merged from both systems
  open http://{HOST}:{p['api']}/ in a browser and log in as alice
  dsbc -c {cfg} migrate --customer 1 --to target
  dsbc -c {cfg} where account:100001                      # now on the target (MR115)
  dsbc -c {cfg} rollback <batch id printed by migrate>
  dsbc -c {cfg} status
"""

    async def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        for h in reversed(self.handles):
            res = h.stop()
            if asyncio.iscoroutine(res) or isinstance(res, asyncio.Future):
                await res


class _OneShot(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if not self.answer.done():
            self.answer.set_result(data)


async def udp_ask(data: bytes | Callable[[int], bytes], addr: tuple[str, int], timeout: float) -> bytes | None:
    """Send one datagram from a fresh loopback socket and wait for the first answer."""
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(_OneShot, local_addr=(HOST, 0))
    try:
        lport = transport.get_extra_info("sockname")[1]
        transport.sendto(data(lport) if callable(data) else data, addr)
        return await asyncio.wait_for(proto.answer, timeout)
    except (TimeoutError, OSError):
        return None
    finally:
        transport.close()


async def sip_options(host: str, port: int, user: str | None = None, timeout: float = 1.0) -> str | None:
    """One OPTIONS (or, with ``user``, an out-of-dialog OPTIONS from that account) via UDP."""
    ruri = f"sip:{user}@{host}:{port}" if user else f"sip:{host}:{port}"
    frm = f"sip:{user}@{host}" if user else f"sip:demo@{host}"

    def build(lport: int) -> bytes:
        tag = f"{lport}{int(time.monotonic() * 1000) % 100000}"
        return (
            f"OPTIONS {ruri} SIP/2.0\r\nVia: SIP/2.0/UDP {HOST}:{lport};branch=z9hG4bK{tag};rport\r\n"
            f"Max-Forwards: 70\r\nFrom: <{frm}>;tag={tag}\r\nTo: <{ruri}>\r\nCall-ID: demo-{tag}\r\n"
            f"CSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
        ).encode()

    data = await udp_ask(build, (host, port), timeout)
    return data.decode("latin-1") if data else None


async def self_check(demo: Demo) -> list[str]:
    """One request of each kind through dsbc; returns report lines."""
    import aiohttp

    from .radius import packet as rp

    lines: list[str] = []
    p = demo.ports
    for account in ("100001", "100004"):
        reply = await sip_options(HOST, p["sip"], account, timeout=3)
        system = _header(reply or "", "X-System") or "?"
        lines.append(f"SIP OPTIONS from account {account}: {(reply or 'no answer').splitlines()[0] if reply else 'no answer'} from {system}")
    async with aiohttp.ClientSession() as http:
        for login in ("alice", "dave"):
            async with http.post(
                f"http://{HOST}:{p['api']}/rest/Session/login",
                data={"params": json.dumps({"login": login, "password": "secret"})},
            ) as r:
                body = await r.text()
            lines.append(f"API Session/login {login}: HTTP {r.status} {body[:80]}")
        lines.append(await _admin_list(http, f"http://{HOST}:{p['api']}/rest"))
    for user in ("100001", "100004"):
        answer = await _radius_auth(HOST, p["radius"], user, RADIUS_SECRET_CLIENT.encode(), rp)
        lines.append(f"RADIUS Access-Request {user}: {answer}")
    return lines


async def _admin_list(http: Any, base: str) -> str:
    """An admin login on the admin vhost, then the customer list merged from both systems."""
    host = {"Host": "admin.localhost"}
    login = {"params": json.dumps({"login": "admin", "password": "admin"})}
    async with http.post(f"{base}/Session/login", data=login, headers=host) as r:
        doc = await r.json(content_type=None)
    sid = doc.get("session_id") if isinstance(doc, dict) else None
    if not sid:
        return f"API admin Session/login: HTTP {r.status} {str(doc)[:80]}"
    auth = {"auth_info": json.dumps({"session_id": sid})}
    async with http.post(f"{base}/Customer/get_customer_list", data=auth, headers=host) as r:
        doc = await r.json(content_type=None)
    rows = doc.get("customer_list") if isinstance(doc, dict) else None
    if not isinstance(rows, list):
        return f"API admin Customer/get_customer_list: HTTP {r.status} {str(doc)[:80]}"
    names = ", ".join(str(c.get("login")) for c in rows if isinstance(c, dict))
    return f"API admin Customer/get_customer_list: {len(rows)} customers merged from both systems ({names})"


async def _radius_auth(host: str, port: int, user: str, secret: bytes, rp: Any) -> str:
    auth = os.urandom(16)
    pkt = rp.Packet(rp.ACCESS_REQUEST, 7, auth, [(rp.USER_NAME, user.encode()), (rp.USER_PASSWORD, rp.hide_password(b"x", secret, auth))])
    data = await udp_ask(rp.encode(pkt), (host, port), 3.0)
    if data is None:
        return "no answer"
    try:
        ans = rp.decode(data)
    except Exception as exc:  # noqa: BLE001 - a report line, not a crash
        return f"undecodable answer: {exc}"
    return f"code {ans.code} {ans.get_text(rp.REPLY_MESSAGE) or ''}"


def _header(text: str, name: str) -> str:
    for line in text.split("\r\n"):
        k, _, v = line.partition(":")
        if k.strip().lower() == name.lower():
            return v.strip()
    return ""


async def run_demo(workdir: Path, sip_port: int, api_port: int, duration: float | None, check: bool, temporary: bool = False) -> int:
    demo = Demo(workdir, sip_port, api_port, temporary)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGHUP: the terminal closed
        loop.add_signal_handler(sig, stop.set)
    try:
        await demo.start_systems()
        demo.write_config()
        demo.write_sipp_scenario()
        demo.seed_store()
        demo.start_dsbc()
        await demo.wait_ready(stop)
        if stop.is_set():
            click.echo("interrupted while starting: stopped", err=True)
            return 130
        if check:
            stops = "it stops after the checks below" if duration is None else f"it stops {duration:g} s after the checks below"
        else:
            stops = "Ctrl-C stops it" if duration is None else f"it stops after {duration:g} s, or on Ctrl-C"
        click.echo(demo.banner(stops))
        sync = loop.create_task(demo.sync_billing())
        code = 0
        if check:
            await asyncio.sleep(2.5)  # let the first health pings come back
            for line in await self_check(demo):
                click.echo("  " + line)
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "dsbc.cli", "-c", str(demo.config_path),
                "migrate", "--customer", "1", "--to", "target",
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            )  # fmt: skip
            output, _ = await asyncio.wait_for(proc.communicate(), 60)
            text = output.decode(errors="replace").strip().replace("\n", " | ")
            click.echo(f"  dsbc migrate --customer 1 --to target: {text}")
            await asyncio.sleep(0.6)
            reply = await sip_options(HOST, demo.ports["sip"], "100001", timeout=3)
            click.echo(f"  SIP OPTIONS from account 100001 after the migration: answered by {_header(reply or '', 'X-System') or 'nobody'}")
            code = 0 if reply else 1
        if duration is not None:
            try:
                await asyncio.wait_for(stop.wait(), duration)
            except TimeoutError:
                pass
        elif not check:
            await stop.wait()
        sync.cancel()
        return code
    finally:
        await demo.stop()


def _config_options(f: Any) -> Any:
    from .cli import config_options_with

    why = "Not used: the demo writes its own config and store (in --dir); refused, not ignored."
    return config_options_with(why, why)(f)


@click.command("demo")
@click.option("--dir", "workdir", type=click.Path(file_okay=False), default=None, help="Where to write the demo's config, store and logs (default: a new temporary directory, removed when the demo ends well).")
@click.option("--sip-port", type=click.IntRange(0, 65535), default=5060, show_default=True,
              help="Preferred SIP port (a free one is used if taken; 0: any free one).")
@click.option("--api-port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="Preferred API port.")
@click.option("--duration", type=FiniteFloat(min=0), default=None,
              help="Stop after this many seconds instead of waiting for Ctrl-C.")
@click.option("--check", is_flag=True, help="Send one request of each kind through dsbc, migrate a customer, show the result, then stop.")
@_config_options  # taken as every command takes them, to say why the demo does not use them
def demo_command(workdir: str | None, sip_port: int, api_port: int, duration: float | None, check: bool) -> None:
    """Start a complete local demo: dsbc and two emulated systems (MR100, MR115) on loopback."""
    meta = click.get_current_context().find_root().meta
    given = [opt for opt, key in (("-c/--config", "dsbc.config"), ("--store", "dsbc.store")) if meta.get(key)]
    if given:
        raise click.UsageError(
            f"the demo writes its own config and store (in --dir): {' and '.join(given)} not used; "
            "run the demo without it, or `dsbc run` for your own config"
        )
    path = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="dsbc-demo-"))
    path.mkdir(parents=True, exist_ok=True)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    code = asyncio.run(run_demo(path, sip_port, api_port, duration, check, temporary=workdir is None))
    if workdir is None:
        _drop_temporary(path, code)
    sys.exit(code)


def _drop_temporary(path: Path, code: int) -> None:
    """The temporary directory the demo made goes when it ends well; after a failure
    its logs are what the user needs, so it stays and is named."""
    if code in (0, 130):  # 130: stopped by Ctrl-C while starting
        shutil.rmtree(path, ignore_errors=True)
    else:
        click.echo(f"the demo's config, store and logs are kept in {path}", err=True)
