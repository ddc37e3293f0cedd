"""deploy/: the files an operator copies to a node, tried as they are.

keepalived.conf runs in two network namespaces (two nodes on a veth link, unicast VRRP,
a VIP), its check scripts replaced by stand-ins of check_dsbc.sh whose answers the test
sets: what an operator expects of the file's comments must happen to the VIP."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KEEPALIVED_CONF = REPO / "deploy" / "keepalived.conf"

CHECK = """#!/bin/sh
# check_dsbc.sh [--strict] of node {n}: 7 when dsbc is down, 22 with --strict without Redis
[ -f {d}/{n}.down ] && exit 7
[ "${{1:-}}" = "--strict" ] && [ -f {d}/{n}.nostore ] && exit 22
exit 0
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def two_nodes(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    """keepalived with deploy/keepalived.conf on nodes a and b; yields (flag directory,
    node -> namespace)."""
    if shutil.which("keepalived") is None or shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("needs keepalived, iproute2 and root (network namespaces)")
    tag = f"{os.getpid() % 100000}"
    ns = {"a": f"dka{tag}", "b": f"dkb{tag}"}
    dev = {"a": f"dva{tag}", "b": f"dvb{tag}"}
    addr = {"a": "10.89.0.1", "b": "10.89.0.2"}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        try:
            for n in "ab":
                _ip("netns", "add", ns[n])
            _ip("link", "add", dev["a"], "type", "veth", "peer", "name", dev["b"])
        except subprocess.CalledProcessError as exc:
            pytest.skip(f"cannot make network namespaces: {exc.stderr.decode().strip()}")
        text = KEEPALIVED_CONF.read_text()
        for n, peer in (("a", "b"), ("b", "a")):
            _ip("link", "set", dev[n], "netns", ns[n])
            _ip("-n", ns[n], "addr", "add", f"{addr[n]}/24", "dev", dev[n])
            _ip("-n", ns[n], "link", "set", dev[n], "up")
            script = tmp_path / f"check_{n}.sh"
            script.write_text(CHECK.format(n=n, d=tmp_path))
            script.chmod(0o755)
            conf = (text.replace("/usr/local/lib/dsbc/check_dsbc.sh", str(script))
                    .replace("interface eth0", f"interface {dev[n]}")
                    .replace("script_user dsbc", "script_user root")
                    .replace("198.51.100.11 ", f"{addr[n]} ").replace("        198.51.100.12 ", f"        {addr[peer]} ")
                    .replace("203.0.113.10/24 dev eth0", f"10.89.0.100/24 dev {dev[n]}")
                    .replace("router_id dsbc-a", f"router_id dsbc-{n}"))
            (tmp_path / f"{n}.conf").write_text(conf)
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", ns[n], "keepalived", "-n", "-l", "-D", "-f", str(tmp_path / f"{n}.conf"),
                 "-p", str(tmp_path / f"{n}.pid"), "-r", str(tmp_path / f"{n}.vrrp.pid"),
                 "-c", str(tmp_path / f"{n}.chk.pid")],
                stdout=(tmp_path / f"{n}.log").open("wb"), stderr=subprocess.STDOUT, start_new_session=True))
        yield tmp_path, ns
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(p.pid, signal.SIGKILL)
        for n in "ab":
            subprocess.run(["ip", "netns", "del", ns[n]], capture_output=True, timeout=10, check=False)


def vip_holders(ns: dict[str, str]) -> list[str]:
    out = []
    for n, name in ns.items():
        r = subprocess.run(["ip", "-n", name, "-4", "addr"], capture_output=True, text=True, timeout=10, check=True)
        if "10.89.0.100/" in r.stdout:
            out.append(n)
    return out


def wait_vip(ns: dict[str, str], want: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if vip_holders(ns) == [want]:
            return
        time.sleep(0.25)
    raise AssertionError(f"the VIP is on {vip_holders(ns)}, not on {want} after {timeout} s")


@pytest.mark.timeout(120)
def test_keepalived_gives_the_vip_to_the_node_that_reaches_redis(two_nodes: tuple[Path, dict[str, str]]) -> None:
    """The shipped file had priority 150 / 100 and `nopreempt` with the store check's
    weight -30: a master that lost Redis kept the VIP (150 - 30 is above 100, and
    nopreempt stops the peer taking it anyway), against its own comment and OPERATIONS
    section 5.  Same priority on both nodes and preemption: the VIP goes to the node that
    reaches Redis, and does not come back when a node returns."""
    flags, ns = two_nodes
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and len(vip_holders(ns)) != 1:
        time.sleep(0.25)
    master, = vip_holders(ns)
    other = "b" if master == "a" else "a"
    (flags / f"{master}.nostore").touch()  # Redis unreachable from the master
    wait_vip(ns, other, 15)
    (flags / f"{master}.nostore").unlink()
    time.sleep(5)
    assert vip_holders(ns) == [other]  # no flapping back once Redis is back
    (flags / f"{other}.down").touch()  # dsbc stops on the VIP holder
    wait_vip(ns, master, 10)
    (flags / f"{other}.down").unlink()
    time.sleep(5)
    assert vip_holders(ns) == [master]  # the node that came back does not take it back
    for n in "ab":  # Redis down for everybody: the VIP stays
        (flags / f"{n}.nostore").touch()
    time.sleep(8)
    assert vip_holders(ns) == [master]


def test_keepalived_store_weight_can_move_the_vip() -> None:
    """The same, read from the file (where keepalived is not installed)."""
    text = re.sub(r"#.*", "", KEEPALIVED_CONF.read_text())
    assert "nopreempt" not in text
    assert re.search(r"\bweight\s+-\d+", text)


def _unit() -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    for line in (REPO / "deploy" / "dsbc.service").read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            k, _, v = line.partition("=")
            keys.setdefault(k.strip(), []).append(v.strip())
    return keys


def test_the_unit_does_not_restart_a_bad_configuration() -> None:
    """Restart=on-failure started a node whose file was bad again every 2 s, forever
    (the start limit, 5 in 10 s, is not reached at that pace): its exit status 2 says
    that starting again cannot help."""
    from dsbc.config import ConfigError

    unit = _unit()
    assert unit["Restart"] == ["on-failure"]
    assert str(ConfigError("x").exit_code) in " ".join(unit.get("RestartPreventExitStatus", [])).split()


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("no systemd-analyze")
    exe = tmp_path / "dsbc"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    unit = tmp_path / "dsbc.service"
    unit.write_text((REPO / "deploy" / "dsbc.service").read_text().replace("/usr/local/bin/dsbc", str(exe)))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60,
                       check=False)
    ours = [line for line in (r.stdout + r.stderr).splitlines() if "dsbc.service" in line]
    assert not ours, ours


def _sysctl() -> dict[str, str]:
    out = {}
    for line in (REPO / "deploy" / "sysctl-dsbc.conf").read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            k, _, v = line.partition("=")
            out[k.strip().removeprefix("-")] = " ".join(v.split())  # "-key": failure ignored
    return out


def test_sysctl_file_sets_what_the_runbook_says_to_set() -> None:
    """OPERATIONS.md tells the operator to set `net.ipv4.tcp_migrate_req = 1` (a connection
    queued on a reloading worker's listener moves to the new one, not reset) and puts the
    kernel settings in deploy/sysctl-dsbc.conf; that file did not have it."""
    docs = (REPO / "docs" / "OPERATIONS.md").read_text()
    named = dict(re.findall(r"`(net\.[a-z0-9_.]+) = ([0-9]+)`", docs))
    assert "net.ipv4.tcp_migrate_req" in named
    conf = _sysctl()
    assert {k: conf.get(k) for k in named} == named


def _ports(spec: str) -> set[int]:
    ports: set[int] = set()
    for part in filter(None, spec.replace(" ", "").split(",")):
        lo, _, hi = part.partition("-")
        ports.update(range(int(lo), int(hi or lo) + 1))
    return ports


def test_the_ephemeral_port_range_spares_the_nodes_servers() -> None:
    """sysctl-dsbc.conf widened ip_local_port_range to 10240-65000, over the port of the
    Redis Sentinel that redis-sentinel.conf runs on the same hosts (26379, outside the
    kernel's default 32768-60999): an outgoing connection could take it first and keep
    Sentinel from starting.  The ports of deploy/'s servers in that range are reserved."""
    conf = _sysctl()
    lo, hi = map(int, conf["net.ipv4.ip_local_port_range"].split())
    sentinel = (REPO / "deploy" / "redis-sentinel.conf").read_text()
    servers = {int(m) for m in re.findall(r"^port\s+(\d+)", sentinel, re.MULTILINE)}
    servers |= {int(m) for m in re.findall(r"store\.url = \"redis\+sentinel://[^\"]*?:(\d+)", sentinel)}
    assert 26379 in servers
    exposed = {p for p in servers if lo <= p <= hi} - _ports(conf.get("net.ipv4.ip_local_reserved_ports", ""))
    assert not exposed, f"servers' ports the kernel may hand out to outgoing connections: {exposed}"


def test_check_dsbc_sh_against_a_running_node(tmp_path: Path) -> None:
    """deploy/check_dsbc.sh as keepalived runs it: 0 while the node serves, 22 with
    --strict while a system has no node up, 7 once dsbc is stopped.  keepalived's scripts
    do not see the operator's environment ($DSBC_CONTROL): a control API on another port
    than 8080 could not be named; the URL is taken as an argument."""
    from tests.peers.dsbc import Dsbc

    script = REPO / "deploy" / "check_dsbc.sh"

    def check(*args: str) -> int:
        env = {k: v for k, v in os.environ.items() if k != "DSBC_CONTROL"}
        return subprocess.run(["sh", str(script), *args], capture_output=True, timeout=10, env=env,
                              check=False).returncode

    d = Dsbc(tmp_path)  # no SIP node in either system: degraded
    with d:
        url = d.control_url
        deadline = time.monotonic() + 10
        while check(url) != 0 and time.monotonic() < deadline:
            time.sleep(0.2)  # "starting" (503) for its first seconds
        assert check(url) == 0
        assert check("--strict", url) == 22
    assert check(url) == 7


def test_the_runbook_says_how_to_get_the_units_executable() -> None:
    """The unit runs /usr/local/bin/dsbc; the runbook only said to copy the unit, and a
    system-wide `pip install .` is refused on Debian 12 (PEP 668): the way to get that
    path is written beside the unit and in OPERATIONS.md."""
    unit = (REPO / "deploy" / "dsbc.service").read_text()
    exe = re.search(r"^ExecStart=(\S+)", unit, re.MULTILINE)
    assert exe is not None
    docs = (REPO / "docs" / "OPERATIONS.md").read_text()
    for text in (unit, docs):
        assert "python3 -m venv /opt/dsbc" in text and f"ln -s /opt/dsbc/bin/dsbc {exe.group(1)}" in text
