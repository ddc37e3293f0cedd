"""FreeRADIUS for the RADIUS benchmark: the home server both dispatchers relay to, and
the peer (FreeRADIUS itself in proxy mode).  Production mode (``-f``, no ``-X`` debug
output, which would cost more than the requests), a private raddb in a temp folder."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Self

from tests.peers.freeradius import FREERADIUS, RADDB_DIRS, free_udp_ports
from tests.peers.net import is_bound
from tests.peers.proc import PeerError, PeerProcess

PASSWORD = "bench-password"

_HEAD = (
    RADDB_DIRS
    + """\
max_request_time = 10
cleanup_delay = 5
max_requests = 262144
hostname_lookups = no
log {{
\tdestination = files
\tfile = {d}/radius.log
\tauth = no
}}
security {{
\tallow_core_dumps = no
\tmax_attributes = 200
\treject_delay = 0
\tstatus_server = yes
}}
thread pool {{
\tstart_servers = 5
\tmax_servers = 32
\tmin_spare_servers = 3
\tmax_spare_servers = 10
\tmax_requests_per_server = 0
\tmax_queue_size = 65536
}}
"""
)

_HOME = (
    _HEAD
    + """\
proxy_requests = no
client dispatchers {{
\tipaddr = 127.0.0.1
\tsecret = {secret}
\trequire_message_authenticator = no
}}
modules {{
\tfiles {{
\t\tfilename = {d}/users
\t}}
\tpap {{
\t}}
}}
server default {{
\tlisten {{
\t\ttype = auth
\t\tipaddr = 127.0.0.1
\t\tport = {port}
\t}}
\tauthorize {{
\t\tfiles
\t\tpap
\t}}
\tauthenticate {{
\t\tAuth-Type PAP {{
\t\t\tpap
\t\t}}
\t}}
\tpost-auth {{
\t}}
}}
"""
)

_PROXY = (
    _HEAD
    + """\
proxy_requests = yes
proxy server {{
\tdefault_fallback = no
}}
home_server home {{
\ttype = auth
\tipaddr = 127.0.0.1
\tport = {home_port}
\tsecret = {home_secret}
\tresponse_window = 5
\tzombie_period = 40
\tstatus_check = none
\tmax_outstanding = 65536
}}
home_server_pool home_pool {{
\ttype = fail-over
\thome_server = home
}}
realm home_realm {{
\tauth_pool = home_pool
\tnostrip
}}
client nas {{
\tipaddr = 127.0.0.1
\tsecret = {secret}
\trequire_message_authenticator = no
}}
modules {{
}}
server default {{
\tlisten {{
\t\ttype = auth
\t\tipaddr = 127.0.0.1
\t\tport = {port}
\t}}
\tauthorize {{
\t\tupdate control {{
\t\t\t&Proxy-To-Realm := "home_realm"
\t\t}}
\t}}
\tauthenticate {{
\t}}
\tpost-proxy {{
\t}}
}}
"""
)


class FreeRadiusBench:
    def __init__(self, workdir: Path, text: str, port: int, name: str) -> None:
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.name = name
        (self.dir / "radiusd.conf").write_text(text)
        (self.dir / "dictionary").write_text("")
        self.proc: PeerProcess | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def addr(self) -> tuple[str, int]:
        return "127.0.0.1", self.port

    def start(self, timeout: float = 20.0) -> Self:
        if FREERADIUS is None:
            raise PeerError("freeradius not found")
        self.proc = PeerProcess(
            f"freeradius-{self.name}",
            [FREERADIUS, "-f", "-d", str(self.dir)],
            self.dir / "stderr.log",
        )
        self.proc.start()
        deadline = time.monotonic() + timeout
        while not is_bound("127.0.0.1", self.port, "udp"):
            if not self.proc.alive() or time.monotonic() > deadline:
                log = (
                    (self.dir / "radius.log").read_text(errors="replace")
                    if (self.dir / "radius.log").exists()
                    else ""
                )
                raise PeerError(
                    f"freeradius {self.name} did not start:\n{self.proc.log_tail()}\n{log[-2000:]}"
                )
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(grace=3.0)
            self.proc = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def home_server(workdir: Path, secret: str) -> FreeRadiusBench:
    """Accepts every user whose password is PASSWORD (a DEFAULT entry: no per-user table)."""
    port = free_udp_ports(1)[0]
    fr = FreeRadiusBench(workdir, _HOME.format(d=workdir, secret=secret, port=port), port, "home")
    (workdir / "users").write_text(
        f'DEFAULT\tCleartext-Password := "{PASSWORD}"\n\tReply-Message := "ok"\n'
    )
    return fr


def proxy_server(
    workdir: Path, nas_secret: str, home: tuple[str, int], home_secret: str
) -> FreeRadiusBench:
    port = free_udp_ports(1)[0]
    text = _PROXY.format(
        d=workdir, secret=nas_secret, port=port, home_port=home[1], home_secret=home_secret
    )
    return FreeRadiusBench(workdir, text, port, "proxy")
