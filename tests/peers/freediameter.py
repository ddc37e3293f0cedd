"""A real freeDiameter daemon for tests, acting as a Diameter relay agent.

Debian's freeDiameter ships no credit-control application, so it cannot send or answer
a CCR; it can relay one.  It also refuses to start with only loopback addresses, so it
runs inside a private network namespace joined to ours by a veth pair:

    test process (root namespace)            namespace dsbcfd-PID
    10.213.X.1  <------------- veth ------------->  10.213.X.2  freeDiameterd

Only addresses of that private link are used; nothing leaves the machine.  Creating
namespaces needs root (CI runs as root); :func:`netns_unavailable` says why not, for a
clear skip.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

FREEDIAMETERD = shutil.which("freeDiameterd")
IP = shutil.which("ip")
OPENSSL = shutil.which("openssl")


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), check=False, capture_output=True, text=True, timeout=20)


def netns_unavailable() -> str | None:
    """None when a relay test can run, else the reason to skip."""
    if FREEDIAMETERD is None:
        return "freeDiameterd not installed (apt-get install freediameterd)"
    if IP is None or OPENSSL is None:
        return "ip (iproute2) and openssl are needed for the freeDiameter relay test"
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs the relay test as root)"
    return None


class VethNamespace:
    """A network namespace with a veth link to the root namespace; ``close()`` removes both."""

    def __init__(self) -> None:
        pid = os.getpid()
        self.name = f"dsbcfd-{pid}"
        self.veth_host = f"dfd{pid % 100000}a"
        self.veth_ns = f"dfd{pid % 100000}b"
        third = 16 + pid % 200
        self.host_ip = f"10.213.{third}.1"
        self.ns_ip = f"10.213.{third}.2"
        self.created = False

    def open(self) -> None:
        self.close()  # leftovers of a killed run with the same pid
        steps = [
            ("netns", "add", self.name),
            ("link", "add", self.veth_host, "type", "veth", "peer", "name", self.veth_ns),
            ("link", "set", self.veth_ns, "netns", self.name),
            ("addr", "add", f"{self.host_ip}/30", "dev", self.veth_host),
            ("link", "set", self.veth_host, "up"),
            ("-n", self.name, "addr", "add", f"{self.ns_ip}/30", "dev", self.veth_ns),
            ("-n", self.name, "link", "set", self.veth_ns, "up"),
            ("-n", self.name, "link", "set", "lo", "up"),
        ]
        self.created = True
        for step in steps:
            r = _run(IP or "ip", *step)
            if r.returncode != 0:
                self.close()
                raise OSError(f"ip {' '.join(step)}: {r.stderr.strip()}")

    def close(self) -> None:
        _run(IP or "ip", "link", "del", self.veth_host)
        _run(IP or "ip", "netns", "del", self.name)
        self.created = False


class FreeDiameterRelay:
    """freeDiameterd in the namespace, connecting out to the configured peers (no TLS)."""

    def __init__(self, workdir: Path, ns: VethNamespace, identity: str, realm: str,
                 peers: list[tuple[str, str, int]], tls_old_method: tuple[str, ...] = (),
                 tls_on_connect: tuple[str, ...] = ()) -> None:
        self.dir = workdir
        #: peers asked for TLS after the CER/CEA (RFC 3588 style: Inband-Security-Id TLS)
        self.tls_old_method = tls_old_method
        #: peers reached with TLS from the first byte (freeDiameter's default, RFC 6733)
        self.tls_on_connect = tls_on_connect
        self.ns = ns
        self.identity = identity
        self.realm = realm
        self.peers = peers  # (Diameter identity, address, port)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.dir / "freediameter.log"

    def write_config(self) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        cert, key = self.dir / "cert.pem", self.dir / "key.pem"
        # freeDiameter will not start without TLS credentials, even when no peer uses TLS
        r = _run(OPENSSL or "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                 "-out", str(cert), "-days", "2", "-subj", f"/CN={self.identity}")
        if r.returncode != 0:
            raise OSError(f"openssl: {r.stderr.strip()}")
        lines = [
            f'Identity = "{self.identity}";', f'Realm = "{self.realm}";', "Port = 3868;", "SecPort = 3869;",
            f'ListenOn = "{self.ns.ns_ip}";', "No_SCTP;", "No_IPv6;", "TcTimer = 2;",
            f'TLS_Cred = "{cert}", "{key}";', f'TLS_CA = "{cert}";',
        ]
        for ident, addr, port in self.peers:
            tls = ("TLS_old_method; " if ident in self.tls_old_method
                   else "" if ident in self.tls_on_connect else "No_TLS; ")
            lines.append(f'ConnectPeer = "{ident}" {{ ConnectTo = "{addr}"; Port = {port}; {tls}}};')
        conf = self.dir / "freeDiameter.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def start(self, timeout: float = 20.0) -> None:
        conf = self.write_config()
        log = open(self.log_path, "wb")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen([IP or "ip", "netns", "exec", self.ns.name, FREEDIAMETERD or "freeDiameterd",
                                      "-c", str(conf), "-dd"], stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "daemon initialized" in self.log_path.read_text(errors="replace"):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("freeDiameterd did not start:\n" + self.log_tail())

    def is_open(self, identity: str) -> bool:
        """Whether freeDiameter has its connection to ``identity`` open (it routes to a peer
        only from then on, a moment after the peer itself took the connection for open)."""
        if not self.log_path.exists():
            return False
        return f"-> 'STATE_OPEN'\t'{identity}'" in self.log_path.read_text(errors="replace")

    def log_tail(self, n: int = 60) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        p, self.proc = self.proc, None
        if p is None:
            return
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
