"""Back ends named by host name (``systems.*.sip``, ``radius``, ``diameter``).

Before: a SIP node named ``localhost`` passed validation, then every message to it died in
the transport with a traceback ("a DNS lookup is required"); a RADIUS server name that did
not resolve made every worker start fail with "Name or service not known" and no key.
Now names are resolved when dsbc starts (and on SIGHUP): a name that resolves works like
its address (and the node is a trusted peer by that address), one that does not stops
the start with the file, line and key.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsbc.config import ConfigError, parse_config
from dsbc.resolve import resolve_backends
from dsbc.sip_service import trusted_peers
from dsbc.store import open_store
from tests.peers.dsbc import Dsbc
from tests.peers.net import free_port
from tests.test_sip_workers import Registrar, register

UNRESOLVABLE = "no-such-host.invalid"  # RFC 2606: never resolves


#: every dispatcher that uses a back-end name on (names are only resolved for those);
#: (the ports are replaced by free ones where dsbc is started)
SERVICES = ('[sip]\nlisten = ["udp:127.0.0.1:5060"]\nworkers = 1\n'
            '[radius]\nenabled = true\nauth_listen = "127.0.0.1:1812"\nacct_listen = "127.0.0.1:1813"\n'
            '[[radius.clients]]\naddress = "127.0.0.1"\nsecret = "nas"\n'
            '[diameter]\nenabled = true\nlisten = "127.0.0.1:3868"\n'
            '[api]\nenabled = false\n[control]\nenabled = false\n')


def _cfg(systems: str, tmp_path: Path) -> Path:
    db = tmp_path / "loc.db"
    open_store(f"sqlite:///{db}").close()
    path = tmp_path / "dsbc.toml"
    services = SERVICES  # free ports: a refusal for a port in use would come first
    for port, kind in (("5060", "udp"), ("1812", "udp"), ("1813", "udp"), ("3868", "tcp")):
        services = services.replace(f"127.0.0.1:{port}", f"127.0.0.1:{free_port(kind)}")
    path.write_text(f'[store]\nurl = "sqlite:///{db}"\n\n{systems}\n{services}')
    return path


@pytest.mark.parametrize(("systems", "line", "key"), [
    (f'[systems.source]\nsip = ["udp:127.0.0.1:5070", "udp:{UNRESOLVABLE}:5060"]\n', 5, "systems.source.sip[1]"),
    (f'[systems.target]\nradius = ["{UNRESOLVABLE}"]\nradius_secret = "s"\n', 5, "systems.target.radius[0]"),
    (f'[systems.source]\ndiameter = "{UNRESOLVABLE}:3868"\n', 5, "systems.source.diameter"),
])
def test_run_refuses_a_back_end_name_that_does_not_resolve(tmp_path: Path, systems: str, line: int, key: str) -> None:
    cfg = _cfg(systems, tmp_path)
    proc = subprocess.run([sys.executable, "-m", "dsbc.cli", "run", "-c", str(cfg)],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith(f"dsbc: {cfg}:{line}: {key}: cannot resolve '{UNRESOLVABLE}'"), proc.stderr


def test_names_become_addresses_and_trusted_peers() -> None:
    cfg = resolve_backends(parse_config(
        '[systems.source]\nsip = ["udp:localhost:5070", "tcp:10.0.0.1:5060"]\n'
        'radius = ["localhost", "[::1]:1645"]\nradius_acct = ["localhost:1646"]\nradius_secret = "s"\n'
        f'diameter = "localhost"\n{SERVICES}'.replace('"udp:127.0.0.1:5060"]', '"udp:127.0.0.1:5060", "tcp:127.0.0.1:5060"]')))
    src = cfg.systems.source
    assert src.sip == ["udp:127.0.0.1:5070", "tcp:10.0.0.1:5060"]
    assert src.radius == ["127.0.0.1:1812", "[::1]:1645"]
    assert src.radius_acct == ["127.0.0.1:1646"]
    assert src.diameter == "localhost"  # resolved again on each connection
    peers = trusted_peers(cfg)
    assert peers.contains("127.0.0.1", 5070) and not peers.contains("127.0.0.1", 5071)


def test_names_of_a_disabled_dispatcher_are_not_looked_up() -> None:
    cfg = resolve_backends(parse_config(
        f'[systems.source]\nradius = ["{UNRESOLVABLE}"]\nradius_secret = "s"\ndiameter = "{UNRESOLVABLE}"\n'))
    assert cfg.systems.source.radius == [UNRESOLVABLE]


def test_a_config_without_a_file_names_the_key() -> None:
    with pytest.raises(ConfigError, match=rf"^dsbc.toml: systems.source.sip\[0\]: cannot resolve '{UNRESOLVABLE}'"):
        resolve_backends(parse_config(f'[systems.source]\nsip = ["udp:{UNRESOLVABLE}"]\n'))


@pytest.mark.peers
@pytest.mark.timeout(60)
def test_a_node_named_by_host_name_gets_the_calls(tmp_path: Path) -> None:
    with Registrar() as node, Dsbc(tmp_path / "dsbc", source=[f"udp:localhost:{node.port}"]) as d:
        d.wait_nodes_up()
        import socket

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as phone:
            phone.bind(("127.0.0.1", 0))
            phone.settimeout(3)
            phone.sendto(register("alice", phone.getsockname()[1]), d.sip_addr)
            answer = phone.recv(65535)
        assert answer.startswith(b"SIP/2.0 200"), answer
        assert b"x-system: registrar" in answer.lower()
        # SIGHUP with a name that no longer resolves: refused, the running workers go on
        text = d.config_path.read_text()
        d.config_path.write_text(text.replace(f"udp:localhost:{node.port}", f"udp:{UNRESOLVABLE}:{node.port}"))
        assert d.proc is not None
        os.kill(d.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 20
        while "reload refused" not in d.log_tail(200) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert f"systems.source.sip[0]: cannot resolve '{UNRESOLVABLE}'" in d.log_tail(200)
        assert d.proc.alive()
        assert not d.traceback(), d.traceback()
