"""A real FreeRADIUS 3 server for tests, with a private minimal raddb in a temp folder.

``freeradius -X -d DIR`` runs in the foreground on 127.0.0.1 free ports, as whoever runs
the tests (no ``user =`` in the config, so no root needed).  The ``files`` module answers
each configured user (PAP, CHAP, MS-CHAP with its MPPE keys, EAP-MD5) with a Reply-Message
naming the system, and a ``linelog`` instance
writes one line per accounting request (``Start alice s1``) that tests read back.
``radclient`` plays the NAS.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

FREERADIUS = shutil.which("freeradius") or shutil.which("radiusd")
RADCLIENT = shutil.which("radclient")

# a private raddb: every folder FreeRADIUS reads or writes is the temp folder {d}
RADDB_DIRS = """\
prefix = /usr
exec_prefix = /usr
sysconfdir = /etc
localstatedir = {d}
sbindir = /usr/sbin
logdir = {d}
raddbdir = {d}
radacctdir = {d}
name = freeradius
confdir = {d}
modconfdir = {d}
certdir = {d}
cadir = {d}
run_dir = {d}
db_dir = {d}
libdir = /usr/lib/freeradius
pidfile = {d}/radiusd.pid
"""

_CONF = (
    RADDB_DIRS
    + """\
max_request_time = 10
cleanup_delay = 2
max_requests = 16384
hostname_lookups = no
log {{
\tdestination = stdout
\tauth = yes
}}
security {{
\tallow_core_dumps = no
\tmax_attributes = 200
\treject_delay = 0
\tstatus_server = yes
}}
proxy_requests = no
thread pool {{
\tstart_servers = 2
\tmax_servers = 4
\tmin_spare_servers = 1
\tmax_spare_servers = 4
\tmax_requests_per_server = 0
}}
client dsbc {{
\tipaddr = {client}
\tsecret = {secret}
\trequire_message_authenticator = no
}}
modules {{
\tfiles {{
\t\tfilename = {d}/users
\t\tacctusersfile = {d}/acct_users
\t\tpreproxy_usersfile = {d}/acct_users
\t}}
\talways ok {{
\t\trcode = ok
\t}}
\tpap {{
\t}}
\tchap {{
\t}}
\tmschap {{
\t\tuse_mppe = yes
\t\trequire_encryption = no
\t\trequire_strong = no
\t}}
\teap {{
\t\tdefault_eap_type = md5
\t\ttimer_expire = 60
\t\tmd5 {{
\t\t}}
\t}}
\tlinelog acctlog {{
\t\tfilename = {d}/acct.log
\t\tformat = "%{{Acct-Status-Type}} %{{User-Name}} %{{Acct-Session-Id}}"
\t}}
}}
server default {{
\tlisten {{
\t\ttype = auth
\t\tipaddr = {host}
\t\tport = {auth_port}
\t}}
\tlisten {{
\t\ttype = acct
\t\tipaddr = {host}
\t\tport = {acct_port}
\t}}
\tauthorize {{
\t\tchap
\t\tmschap
\t\teap {{
\t\t\tok = return
\t\t}}
\t\tfiles
\t\tpap
\t}}
\tauthenticate {{
\t\tAuth-Type PAP {{
\t\t\tpap
\t\t}}
\t\tAuth-Type CHAP {{
\t\t\tchap
\t\t}}
\t\tAuth-Type MS-CHAP {{
\t\t\tmschap
\t\t}}
\t\teap
\t}}
\taccounting {{
\t\tacctlog
\t\tok
\t}}
\tpost-auth {{
\t\tok
\t}}
}}
"""
)


def free_udp_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class FreeRadius:
    """One FreeRADIUS server: ``start()``, ``acct_lines()``, ``stop()``."""

    def __init__(self, label: str, workdir: Path, secret: str, users: dict[str, str],
                 host: str = "127.0.0.1", client: str = "127.0.0.1") -> None:
        self.label = label
        self.dir = workdir
        self.secret = secret
        self.users = users
        self.host = host
        self.client = client
        self.auth_port, self.acct_port = free_udp_ports(2, host)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.dir / "radiusd.log"

    def write_config(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "radiusd.conf").write_text(_CONF.format(
            d=self.dir, host=self.host, client=self.client, secret=self.secret,
            auth_port=self.auth_port, acct_port=self.acct_port))
        (self.dir / "dictionary").write_text("")
        (self.dir / "acct_users").write_text("")
        (self.dir / "acct.log").write_text("")
        lines = []
        for user, password in self.users.items():
            lines.append(f'{user}\tCleartext-Password := "{password}"\n'
                         f'\tReply-Message := "{self.label} accepts %{{User-Name}}"\n')
        (self.dir / "users").write_text("\n".join(lines))

    def start(self, timeout: float = 15.0) -> None:
        assert FREERADIUS is not None
        self.write_config()
        log = open(self.log_path, "wb")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen([FREERADIUS, "-X", "-d", str(self.dir)], stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            if "Ready to process requests" in text:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"freeradius {self.label} did not start:\n" + self.log_path.read_text(errors="replace")[-3000:])

    def acct_lines(self) -> list[str]:
        return [ln for ln in (self.dir / "acct.log").read_text().splitlines() if ln.strip()]

    def stop(self) -> None:
        p, self.proc = self.proc, None
        if p is None:
            return
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


async def radclient(addr: tuple[str, int], kind: str, secret: str, attrs: str,
                    timeout: float = 3.0, retries: int = 1) -> str:
    """Send one request with radclient (as a NAS would); its -x output, '' on no answer."""
    assert RADCLIENT is not None
    proc = await asyncio.create_subprocess_exec(
        RADCLIENT, "-x", "-r", str(retries), "-t", str(timeout), f"{addr[0]}:{addr[1]}", kind, secret,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(attrs.encode() + b"\n"), timeout * (retries + 1) + 10)
    text = out.decode(errors="replace")
    return text if "Received" in text else ""
