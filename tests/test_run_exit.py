"""`dsbc run` exit status when the workers cannot start (systemd must see a failure)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dsbc.store import open_store


def _run(tmp_path: Path, sections: str, timeout: float = 120) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """`dsbc run` of a config with a fresh SQLite store and these other sections."""
    db = tmp_path / "loc.db"
    open_store(f"sqlite:///{db}").close()
    cfg = tmp_path / "dsbc.toml"
    cfg.write_text(f'[store]\nurl = "sqlite:///{db}"\n\n{sections}')
    proc = subprocess.run([sys.executable, "-m", "dsbc.cli", "run", "-c", str(cfg)],
                          capture_output=True, text=True, timeout=timeout, cwd=tmp_path, check=False)
    return cfg, proc


def test_run_exits_1_when_workers_cannot_start(tmp_path: Path) -> None:
    # no address of this host: every worker start fails (the master's own check, which
    # now refuses this address before any worker starts, is taken out to get there)
    db = tmp_path / "loc.db"
    open_store(f"sqlite:///{db}").close()
    cfg = tmp_path / "dsbc.toml"
    cfg.write_text(f'[store]\nurl = "sqlite:///{db}"\n\n[sip]\nlisten = ["udp:192.0.2.1:5060"]\n'
                   'workers = 1\n\n[api]\nenabled = false\n\n[control]\nenabled = false\n')
    code = ("import sys, dsbc.runner as r; r.check_listeners = lambda cfg: []; "
            "from dsbc.cli import main; main(['run', '-c', sys.argv[1]])")
    proc = subprocess.run([sys.executable, "-c", code, str(cfg)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, check=False)
    assert "giving up" in proc.stderr
    assert proc.returncode == 1, proc.stderr


def _check(cfg: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dsbc.cli", "run", "--check", "-c", str(cfg)],
                          capture_output=True, text=True, timeout=60, cwd=cfg.parent, check=False)


def test_run_and_check_refuse_a_listen_address_not_on_this_host(tmp_path: Path) -> None:
    """A mistyped listen address: every worker failed with "Cannot assign requested
    address" and was restarted until the master gave up (a dozen log lines, no key named;
    on a reload worker 0 was replaced, failed, and started again on the old config), and
    `dsbc run --check` said ok."""
    sections = ('[sip]\nlisten = ["udp:127.0.0.1:25170", "tcp:192.0.2.1:25170"]\nworkers = 1\n\n'
                '[api]\nenabled = false\n\n[control]\nenabled = false\n')
    cfg, proc = _run(tmp_path, sections, timeout=60)
    message = (f"dsbc: {cfg}:5: sip.listen[1]: 192.0.2.1 is not an address of this host (a VIP that is "
               "not here yet needs net.ipv4.ip_nonlocal_bind = 1, deploy/sysctl-dsbc.conf)")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == message
    check = _check(cfg)
    assert check.returncode == 2, check.stdout
    assert check.stderr.strip() == message


def test_a_port_below_1024_without_the_right_to_it_is_named(monkeypatch: pytest.MonkeyPatch,
                                                            tmp_path: Path) -> None:
    """Not root and no CAP_NET_BIND_SERVICE: the workers failed to start in a loop."""
    import errno
    import socket

    import click

    from dsbc.config import load_config
    from dsbc.runner import check_listeners_free

    class NoLowPorts(socket.socket):
        def bind(self, address: object) -> None:
            if isinstance(address, tuple) and 0 < address[1] < 1024:
                raise PermissionError(errno.EACCES, "Permission denied")
            super().bind(address)

    monkeypatch.setattr(socket, "socket", NoLowPorts)
    path = tmp_path / "dsbc.toml"
    path.write_text(f'[store]\nurl = "sqlite:///{tmp_path / "loc.db"}"\n\n[sip]\nenabled = false\n\n'
                    '[api]\nlisten = ["127.0.0.1:443"]\nsource = "http://127.0.0.1:1"\n'
                    'target = "http://127.0.0.1:2"\n\n[control]\nenabled = false\n')
    with pytest.raises(click.ClickException) as info:
        check_listeners_free(load_config(path))
    assert info.value.format_message() == (
        f"{path}:8: api.listen[0]: tcp 127.0.0.1:443: permission denied (a port below 1024 needs "
        "root or CAP_NET_BIND_SERVICE, as deploy/dsbc.service gives)")


def test_run_refuses_a_vhost_without_back_end(tmp_path: Path) -> None:
    """Used to pass validation, then every worker crashed with a traceback, in a loop."""
    cfg, proc = _run(tmp_path, '[sip]\nenabled = false\n\n'
                               '[api]\nlisten = ["127.0.0.1:35999"]\n[[api.vhosts]]\nhost = "a"\nrealm = "customer"\n\n'
                               '[control]\nenabled = false\n')
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        f"dsbc: {cfg}:9: api.vhosts[0].source: vhost 'a' has no source back end "
        "(set it here, or api.source, or systems.source.api)")


def test_run_refuses_ports_another_process_holds(tmp_path: Path) -> None:
    """The workers bind with SO_REUSEPORT: without this check a second `dsbc run` (or
    another SO_REUSEPORT server) would share the port and its traffic silently."""
    import socket

    held = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    held.bind(("127.0.0.1", 0))
    port = held.getsockname()[1]
    try:
        cfg, proc = _run(tmp_path, f'[sip]\nlisten = ["udp:127.0.0.1:{port}"]\n\n'
                                   '[api]\nenabled = false\n\n[control]\nenabled = false\n', timeout=60)
    finally:
        held.close()
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip() == (
        f"{cfg}:5: sip.listen[0]: udp 127.0.0.1:{port} is already in use (another program, or another dsbc running with this config?)")


def test_run_refuses_a_radius_port_another_program_holds_at_once(tmp_path: Path) -> None:
    """A RADIUS port taken by, say, FreeRADIUS: named with its key before any worker starts
    (the workers used to wait for it as for a reload's predecessor, then exit 1 after ~40 s
    with no key in the message)."""
    import socket

    held = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    held.bind(("127.0.0.1", 0))
    port = held.getsockname()[1]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as free:
        free.bind(("127.0.0.1", 0))
        acct = free.getsockname()[1]
    try:
        cfg, proc = _run(tmp_path, '[sip]\nenabled = false\n[api]\nenabled = false\n[control]\nenabled = false\n'
                                   f'[radius]\nenabled = true\nauth_listen = "127.0.0.1:{port}"\n'
                                   f'acct_listen = "127.0.0.1:{acct}"\n'
                                   '[[radius.clients]]\naddress = "127.0.0.1"\nsecret = "s"\n', timeout=30)
    finally:
        held.close()
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip() == (
        f"{cfg}:12: radius.auth_listen: udp 127.0.0.1:{port} is already in use "
        "(another program, or another dsbc running with this config?)")


def test_run_names_a_listen_address_that_does_not_resolve(tmp_path: Path) -> None:
    cfg, proc = _run(tmp_path, '[sip]\nenabled = false\n[api]\nenabled = false\n'
                               '[control]\nlisten = "no-such-host.invalid:8080"\n', timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().startswith(f"dsbc: {cfg}:9: control.listen: cannot resolve 'no-such-host.invalid' (")
    check = _check(cfg)
    assert check.returncode == 2, check.stdout
    assert check.stderr.strip().startswith(f"dsbc: {cfg}:9: control.listen: cannot resolve 'no-such-host.invalid' (")


@pytest.mark.parametrize(("listen", "line", "message"), [
    # TLS beside TCP on one port: some handshakes landed on the TCP listener
    (('[sip]\nlisten = ["tcp:127.0.0.1:25161", "tls:127.0.0.1:25161"]\ntls_cert = "c"\ntls_key = "k"\n'
     '[api]\nenabled = false\n[control]\nenabled = false\n'),
     5, "sip.listen[1]: tcp 127.0.0.1:25161 is sip.listen[0]'s too (one port, one listener)"),
    # SIP on the control port: /healthz answered one time in two
    (('[sip]\nlisten = ["udp:127.0.0.1:25160", "tcp:0.0.0.0:25180"]\n[api]\nenabled = false\n'
     '[control]\nlisten = "127.0.0.1:25180"\n'),
     9, "control.listen: tcp 127.0.0.1:25180 is sip.listen[1]'s too (one port, one listener)"),
])
def test_run_refuses_two_of_its_own_listeners_on_one_port(tmp_path: Path, listen: str, line: int, message: str) -> None:
    cfg, proc = _run(tmp_path, listen, timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"dsbc: {cfg}:{line}: {message}"
    # `dsbc run --check` (systemctl reload's first step) used to say ok
    check = _check(cfg)
    assert check.returncode == 2, check.stdout
    assert check.stderr.strip() == f"dsbc: {cfg}:{line}: {message}"


def test_the_port_check_passes_over_time_wait_but_not_over_a_listener(tmp_path: Path) -> None:
    """A restart right after a stop finds the TCP port with connections in TIME_WAIT: that
    must not refuse it, while a live listener must."""
    import socket

    import click
    import pytest

    from dsbc.config import parse_config
    from dsbc.runner import check_listeners_free

    lst = socket.socket()
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind(("127.0.0.1", 0))
    lst.listen()
    port = lst.getsockname()[1]
    cfg = parse_config(
        f'[store]\nurl = "sqlite:///{tmp_path / "loc.db"}"\n\n[sip]\nlisten = ["tcp:127.0.0.1:{port}"]\n\n'
        '[api]\nenabled = false\n\n[control]\nenabled = false\n')
    with pytest.raises(click.ClickException, match="already in use"):
        check_listeners_free(cfg)
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = lst.accept()
    conn.close()  # the server side closes first: its end goes to TIME_WAIT
    client.recv(1)
    client.close()
    lst.close()
    check_listeners_free(cfg)  # no error


def test_a_port_still_held_by_a_draining_worker_is_waited_for_under_uvloop() -> None:
    """On a SIGHUP reload the new worker retries the RADIUS / Diameter ports the old one
    still holds; uvloop's UDP bind error has no errno of its own (its cause has it), and
    was taken for a fatal error: the new worker exited and was restarted in a loop."""
    import asyncio

    import uvloop

    from dsbc.runner import _address_in_use

    async def second_bind() -> OSError:
        loop = asyncio.get_running_loop()
        t, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0))
        try:
            await loop.create_datagram_endpoint(
                asyncio.DatagramProtocol, local_addr=t.get_extra_info("sockname"))
        except OSError as exc:
            return exc
        finally:
            t.close()
        raise AssertionError("the second bind succeeded")

    for run in (uvloop.run, asyncio.run):
        assert _address_in_use(run(second_bind()))


def test_an_ipv6_listener_on_a_host_without_ipv6_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The socket could not even be made (EAFNOSUPPORT): a traceback, now file:line: key."""
    import errno
    import socket

    from dsbc.config import ConfigError, load_config
    from dsbc.runner import check_listeners

    class NoIPv6(socket.socket):
        def __init__(self, family: int = -1, *args: object, **kwargs: object) -> None:
            if family == socket.AF_INET6:
                raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
            super().__init__(family, *args, **kwargs)  # type: ignore[arg-type]

    path = tmp_path / "dsbc.toml"
    path.write_text(f'[store]\nurl = "sqlite:///{tmp_path / "loc.db"}"\n\n[sip]\nlisten = ["udp:[::]:25171"]\n\n'
                    '[api]\nenabled = false\n\n[control]\nenabled = false\n')
    cfg = load_config(path)
    monkeypatch.setattr(socket, "socket", NoIPv6)
    with pytest.raises(ConfigError) as info:
        check_listeners(cfg)
    assert str(info.value) == (f"{path}:5: sip.listen[0]: [::]: cannot open a socket "
                               "(Address family not supported by protocol)")


def test_a_store_that_cannot_be_reached_stops_the_start_with_exit_1(tmp_path: Path) -> None:
    """README: exit 1 when the store could not be reached (2 is bad input); the start gave 2.
    `dsbc run --check` answers ok or not: 2."""
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "dsbc.toml"
    cfg.write_text(f'[store]\nurl = "redis://127.0.0.1:{port}/0"\n\n[sip]\nenabled = false\n\n'
                   '[api]\nenabled = false\n\n[control]\nenabled = false\n')
    message = f"dsbc: {cfg}:2: store.url: cannot open the store: opening the store failed: cannot reach "
    proc = subprocess.run([sys.executable, "-m", "dsbc.cli", "run", "-c", str(cfg)],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith(message) and len(proc.stderr.splitlines()) == 1, proc.stderr
    check = _check(cfg)
    assert check.returncode == 2, check.stderr
    assert check.stderr.startswith(message), check.stderr


def test_workers_left_without_their_master_drain_and_exit(tmp_path: Path) -> None:
    """Found by an audit: after a SIGKILL of the master (an OOM kill), its workers served
    on unsupervised (/healthz "ok", no restarts) and held the ports, so a new `dsbc run`
    failed with "address already in use".  Now they drain and exit."""
    import os
    import signal
    import time

    from tests.peers.dsbc import Dsbc
    from tests.peers.net import free_port

    def gone(pid: int) -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        return state == "Z"  # exited, waiting for init to reap it

    d = Dsbc(tmp_path / "a", source=[f"udp:127.0.0.1:{free_port('udp')}"],
             target=[f"udp:127.0.0.1:{free_port('udp')}"], workers=2)
    d.start()
    try:
        deadline = time.monotonic() + 10
        while len(pids := {s["pid"] for s in d.status()}) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(pids) == 2, d.status()
        assert d.proc is not None and d.proc.proc is not None
        os.kill(d.proc.proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while not all(gone(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(gone(p) for p in pids), d.log_tail()
        assert "the master (pid" in d.log_tail()
        # the ports are free again: the same config starts
        d.proc = None
        d.start()
    finally:
        d.stop()
        for p in pids:
            if not gone(p):
                os.kill(p, signal.SIGKILL)
