"""`dsbc run` and its reload (SIGHUP) check what a worker would only find wrong at its
start (dsbc/preflight.py).

Found by an audit: a reload with a CA file name mistyped drained the old workers, the new
ones failed one after another and the master gave up: the whole node went down.  A vhost
whose port is out of range, a CPE pattern that is no regular expression, an API with one
back end only, `advertise = "[::1]"`: tracebacks or restart loops in the workers, no key
named.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsbc.store import open_store
from tests.peers.dsbc import Dsbc
from tests.peers.net import free_port, sip_options


def _run(tmp_path: Path, sections: str) -> tuple[Path, subprocess.CompletedProcess[str]]:
    db = tmp_path / "loc.db"
    open_store(f"sqlite:///{db}").close()
    cfg = tmp_path / "dsbc.toml"
    sip_off = "" if "[sip]" in sections else "[sip]\nenabled = false\n"
    cfg.write_text(f'[store]\nurl = "sqlite:///{db}"\n[control]\nenabled = false\n{sip_off}{sections}')
    proc = subprocess.run([sys.executable, "-m", "dsbc.cli", "run", "-c", str(cfg)],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False)
    return cfg, proc


API = '[api]\nlisten = ["127.0.0.1:{port}"]\n'


@pytest.mark.parametrize(("extra", "line", "key", "reason"), [
    ('source = "http://127.0.0.1:9"\ntarget = "http://127.0.0.1:9"\nbackend_ca = "/nonexistent/ca.pem"\n',
     11, "api.backend_ca", "cannot load the CA file"),
    (('[[api.vhosts]]\nhost = "www.example.com:99999"\nrealm = "customer"\nsource = "http://127.0.0.1:9"\n'
     'target = "http://127.0.0.1:9"\n'), 10, "api.vhosts[0].host", "bad port in 'www.example.com:99999'"),
    (('cpe_patterns = ["cfg(["]\n[[api.vhosts]]\nhost = "cpe.example.com"\nrealm = "cpe"\n'
     'source = "http://127.0.0.1:9"\ntarget = "http://127.0.0.1:9"\n'), 9, "api.cpe_patterns[0]", "'cfg([': unterminated character set"),
    ('source = "http://127.0.0.1:9"\n', 9, "api.target", "api.source is set but there is no target back end"),
    # was "sip.tls_cert: cannot load the TLS files", with no line and no file name
    (('source = "http://127.0.0.1:9"\ntarget = "http://127.0.0.1:9"\n[sip]\nenabled = true\n'
     'listen = ["udp:127.0.0.1:25999"]\ntls_ca = "/nonexistent/ca.pem"\n'), 12, "sip.tls_ca", "cannot load /nonexistent/ca.pem"),
])
def test_run_names_the_key_a_worker_would_fail_on(tmp_path: Path, extra: str, line: int, key: str, reason: str) -> None:
    cfg, proc = _run(tmp_path, API.format(port=free_port("tcp")) + extra)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"dsbc: {cfg}:{line}: {key}: "), proc.stderr
    assert reason in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.peers.tlsca import TestCA, openssl_available

    if not openssl_available():
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("tls")
    ca = TestCA(d / "ca")
    cert, key = ca.issue("dsbc")
    _other_cert, other_key = ca.issue("other")
    (d / "garbage.pem").write_text("not PEM\n")
    subprocess.run(["openssl", "pkey", "-in", str(key), "-aes256", "-passout", "pass:secret",
                    "-out", str(d / "encrypted.key")], check=True, capture_output=True, timeout=30)
    return {"cert": cert, "key": key, "other_key": other_key, "garbage": d / "garbage.pem",
            "missing": d / "missing.pem", "encrypted": d / "encrypted.key"}


@pytest.mark.parametrize(("section", "cert", "key", "line", "reason"), [
    # was "sip.tls_cert: cannot load CERT / KEY: [Errno 2] No such file or directory" (or
    # "[SSL] PEM lib") at the tls_cert line, whichever of the two files was at fault
    ("sip", "missing", "key", 8, "sip.tls_cert: cannot read {missing}: No such file or directory"),
    ("sip", "cert", "missing", 9, "sip.tls_key: cannot read {missing}: No such file or directory"),
    ("sip", "cert", "other_key", 9, "sip.tls_key: {other_key} is not the key of the certificate {cert}"),
    ("sip", "garbage", "key", 8, "sip.tls_cert: {garbage} holds no PEM certificate"),
    ("sip", "cert", "cert", 9, "sip.tls_key: {cert} holds no PEM private key"),
    ("api", "cert", "garbage", 11, "api.tls_key: {garbage} holds no PEM private key"),
])
def test_tls_file_errors_name_the_file_at_fault(
    tmp_path: Path, tls_files: dict[str, Path], section: str, cert: str, key: str, line: int, reason: str
) -> None:
    listen = '"udp:127.0.0.1:25999", "tls:127.0.0.1:25998"' if section == "sip" else '"127.0.0.1:25997"'
    body = (f'[{section}]\nenabled = true\nlisten = [{listen}]\n'
            f'tls_cert = "{tls_files[cert]}"\ntls_key = "{tls_files[key]}"\n')
    if section == "api":
        body = "[sip]\nenabled = false\n" + body + 'source = "http://127.0.0.1:9"\ntarget = "http://127.0.0.1:9"\n'
    db = tmp_path / "loc.db"
    cfg = tmp_path / "dsbc.toml"
    cfg.write_text(f'[store]\nurl = "sqlite:///{db}"\n[control]\nenabled = false\n{body}')
    proc = subprocess.run([sys.executable, "-m", "dsbc.cli", "run", "--check", "-c", str(cfg)],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"dsbc: {cfg}:{line}: {reason.format(**tls_files)}"), proc.stderr


@pytest.mark.timeout(60)
def test_a_key_with_a_passphrase_is_refused_not_prompted_for(tmp_path: Path, tls_files: dict[str, Path]) -> None:
    """Started from a terminal, OpenSSL asked "Enter PEM pass phrase:" and the start (or
    `dsbc run --check`, or a reload's check) waited there for good; without one it said
    "cannot load ...: [Errno 22] Invalid argument" (found by an audit)."""
    import shutil

    if shutil.which("script") is None:
        pytest.skip("needs script(1) for a terminal")
    db = tmp_path / "loc.db"
    path = tmp_path / "dsbc.toml"
    path.write_text(f'[store]\nurl = "sqlite:///{db}"\n[control]\nenabled = false\n[sip]\n'
                    f'listen = ["udp:127.0.0.1:25999", "tls:127.0.0.1:25998"]\ntls_cert = "{tls_files["cert"]}"\n'
                    f'tls_key = "{tls_files["encrypted"]}"\n')
    command = f"{sys.executable} -m dsbc.cli run --check -c {path}"
    try:  # script(1): dsbc runs with a controlling terminal, where OpenSSL prompts
        proc = subprocess.run(["script", "-qec", command, "/dev/null"], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=20, cwd=tmp_path, check=False)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"dsbc waited for a passphrase: {exc.stdout!r}")
    assert proc.returncode == 2, proc.stdout
    assert "pass phrase" not in proc.stdout, proc.stdout
    assert (f"{path}:8: sip.tls_key: {tls_files['encrypted']} is encrypted with a passphrase, which dsbc "
            "cannot ask for") in proc.stdout, proc.stdout


def test_an_expired_or_expiring_certificate_is_announced(
    tmp_path: Path, tls_files: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """It loads and nginx would serve it silently, but every TLS phone refuses it: the start,
    a reload and `dsbc run --check` say so (found by an audit: not a word)."""
    from dsbc.config import load_config
    from dsbc.tls import _warn_validity

    db = tmp_path / "loc.db"
    path = tmp_path / "dsbc.toml"
    path.write_text(f'[store]\nurl = "sqlite:///{db}"\n[control]\nenabled = false\n[sip]\n'
                    f'listen = ["udp:127.0.0.1:25999", "tls:127.0.0.1:25998"]\ntls_cert = "{tls_files["cert"]}"\n'
                    f'tls_key = "{tls_files["key"]}"\n')
    cfg = load_config(path)
    now = time.time()
    for when, says in ((now + 30 * 86400, "expired on"), (now - 30 * 86400, "is not valid before"), (now, None)):
        caplog.clear()
        _warn_validity(cfg, "sip", cfg.sip.tls_cert, now=when)
        if says is None:  # TestCA's certificates last 2 days
            assert "expires on" in caplog.text and "(in 2.0 days)" in caplog.text, caplog.text
        else:
            assert f"{path}:7: sip.tls_cert: the certificate {tls_files['cert']} {says}" in caplog.text
    # and through the command an operator runs
    proc = subprocess.run([sys.executable, "-m", "dsbc.cli", "run", "--check", "-c", str(path)],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr
    assert f"{path}:7: sip.tls_cert: the certificate {tls_files['cert']} expires on" in proc.stderr


@pytest.mark.peers
@pytest.mark.timeout(90)
def test_a_reload_with_a_value_a_worker_would_fail_on_is_refused(tmp_path: Path) -> None:
    d = Dsbc(tmp_path / "dsbc", sip_extra='advertise = "[::1]"\n')  # an IPv6 address without a port
    with d:
        assert d.proc is not None
        text = d.config_path.read_text()
        d.config_path.write_text(text.replace("[api]\nenabled = false\n",
                                              f'[api]\nlisten = ["127.0.0.1:{free_port("tcp")}"]\n'
                                              'source = "http://127.0.0.1:9"\ntarget = "http://127.0.0.1:9"\n'
                                              'backend_ca = "/nonexistent/typo-ca.pem"\n'))
        os.kill(d.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 20
        while "reload refused" not in d.log_tail(200) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "api.backend_ca: cannot load the CA file" in d.log_tail(200)
        time.sleep(1.0)  # what used to follow: the old workers drained, the new ones failing
        assert d.proc.alive()
        assert sip_options(d.ip, d.port, "udp", timeout=2), d.log_tail()
        assert not d.traceback(), d.traceback()


@pytest.mark.peers
@pytest.mark.timeout(90)
def test_a_reload_with_a_store_that_cannot_be_opened_is_refused(tmp_path: Path) -> None:
    """The new worker used to die with a traceback (the running ones stayed)."""
    with Dsbc(tmp_path / "dsbc") as d:
        assert d.proc is not None
        text = d.config_path.read_text()
        d.config_path.write_text(text.replace(f"sqlite:///{d.db}", "sqlite:////nonexistent/dir/location.db"))
        os.kill(d.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 20
        while "reload refused" not in d.log_tail(200) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "store.url: cannot open the store" in d.log_tail(200), d.log_tail()
        assert d.proc.alive() and sip_options(d.ip, d.port, "udp", timeout=2)
        assert not d.traceback(), d.traceback()


@pytest.mark.peers
@pytest.mark.timeout(90)
def test_a_reload_onto_a_port_another_program_holds_is_refused(tmp_path: Path) -> None:
    import socket

    held = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    held.bind(("127.0.0.1", 0))
    try:
        with Dsbc(tmp_path / "dsbc") as d:
            assert d.proc is not None
            text = d.config_path.read_text()
            d.config_path.write_text(text.replace("listen = [", f'listen = ["udp:127.0.0.1:{held.getsockname()[1]}", ', 1))
            os.kill(d.proc.pid, signal.SIGHUP)
            deadline = time.monotonic() + 20
            while "reload refused" not in d.log_tail(200) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert "is already in use" in d.log_tail(200), d.log_tail()
            time.sleep(1.0)
            assert d.proc.alive()
            assert sip_options(d.ip, d.port, "udp", timeout=2), d.log_tail()
    finally:
        held.close()


def test_run_check_tests_the_config_without_starting(tmp_path: Path) -> None:
    """`dsbc run --check` (`-t`), as `nginx -t`: what a start checks, then exit."""
    db = tmp_path / "new" / "loc.db"
    db.parent.mkdir()
    cfg = tmp_path / "dsbc.toml"
    port = free_port("udp")
    cfg.write_text(f'[store]\nurl = "sqlite:///{db}"\n[control]\nenabled = false\n'
                   f'[sip]\nlisten = ["udp:127.0.0.1:{port}"]\n'
                   '[systems.source]\nsip = ["udp:127.0.0.1:9"]\n[systems.target]\nsip = ["udp:127.0.0.1:9"]\n')

    def check(*flags: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dsbc.cli", "run", *flags, "-c", str(cfg)],
                              capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False)

    for flag in ("--check", "-t"):
        proc = check(flag)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == f"{cfg}: ok: SIP udp:127.0.0.1:{port} (1 worker(s))\n"
    assert not db.exists()  # `dsbc run` makes the store; the check does not
    # what only a start finds: a CA file, a name, a store directory; file:line: key, exit 2
    text = cfg.read_text()
    for old, new, line, key in [
        ('sip = ["udp:127.0.0.1:9"]\n[systems.target]', 'sip = ["udp:nohost.invalid:9"]\n[systems.target]',
         8, "systems.source.sip[0]: cannot resolve 'nohost.invalid'"),
        (f"{db}", "/nonexistent/dir/loc.db", 2, "store.url: cannot create the store"),
        ("[sip]\n", '[sip]\ntls_ca = "/nonexistent/ca.pem"\n', 6, "sip.tls_ca: cannot load /nonexistent/ca.pem"),
    ]:
        cfg.write_text(text.replace(old, new, 1))
        proc = check("--check")
        assert proc.returncode == 2 and not proc.stdout, proc
        assert proc.stderr.startswith(f"dsbc: {cfg}:{line}: {key}"), proc.stderr
        assert "Traceback" not in proc.stderr


def test_a_system_without_radius_servers_or_diameter_peer_is_warned_about(tmp_path: Path) -> None:
    """Found by an audit: RADIUS enabled with no server for a system was warned about only
    by a started worker (not by `--check`), Diameter with no peer not at all, where a
    system without a SIP node is named at file:line by both."""
    cfg = tmp_path / "dsbc.toml"
    cfg.write_text(f'[store]\nurl = "sqlite:///{tmp_path / "loc.db"}"\n[control]\nenabled = false\n'
                   '[sip]\nenabled = false\n'
                   f'[radius]\nenabled = true\nauth_listen = "127.0.0.1:{free_port("udp")}"\n'
                   f'acct_listen = "127.0.0.1:{free_port("udp")}"\n'
                   '[[radius.clients]]\naddress = "127.0.0.1"\nsecret = "nas"\n'
                   f'[diameter]\nenabled = true\nlisten = "127.0.0.1:{free_port("tcp")}"\n'
                   'origin_host = "dsbc.example"\norigin_realm = "example"\n'
                   '[systems.source]\nradius = ["127.0.0.1:9"]\nradius_secret = "s"\n'
                   '[systems.target]\ndiameter = "127.0.0.1:9"\n')
    proc = subprocess.run([sys.executable, "-m", "dsbc.cli", "run", "--check", "-c", str(cfg)],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "systems.target.radius: no RADIUS server while RADIUS is enabled: the target's customers' " \
           "requests are dropped" in proc.stderr, proc.stderr
    assert "systems.source.diameter: no Diameter peer while Diameter is enabled: the source's " \
           "customers' requests get 3002" in proc.stderr, proc.stderr
    assert "systems.source.radius" not in proc.stderr and "systems.target.diameter" not in proc.stderr


def test_an_ipv6_listener_on_another_port_is_warned_about(tmp_path: Path) -> None:
    """Found by an audit: with udp:127.0.0.1:A and udp:[::1]:B, IPv6 phones were given port
    A in Record-Route and Path, where dsbc listens for IPv4 only: their re-INVITEs and BYEs
    were lost.  `--check` (and the start) now say so, naming the listener."""
    db = tmp_path / "loc.db"
    a, b = free_port("udp"), free_port("udp")
    cfg = tmp_path / "dsbc.toml"
    base = (f'[store]\nurl = "sqlite:///{db}"\n[systems.source]\nsip = ["udp:127.0.0.1:9"]\n'
            f'[systems.target]\nsip = ["udp:127.0.0.1:9"]\n[sip]\n')

    def check(listen: str) -> str:
        cfg.write_text(base + f"listen = {listen}\n")
        r = subprocess.run([sys.executable, "-m", "dsbc.cli", "run", "--check", "-c", str(cfg)],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False)
        assert r.returncode == 0, r.stderr
        return r.stderr

    err = check(f'["udp:127.0.0.1:{a}", "udp:[::1]:{b}"]')
    assert f"dsbc.toml:8: sip.listen[1]: udp listener on port {b}" in err and "IPv6 peers" in err, err
    assert "sip.listen" not in check(f'["udp:127.0.0.1:{a}", "udp:[::1]:{a}"]')
    assert "sip.listen" not in check(f'["udp:127.0.0.1:{a}", "udp:127.0.0.2:{b}"]')  # one family


def test_a_cache_file_that_cannot_be_written_is_named(tmp_path: Path) -> None:
    """store.cache_file is what lets a node start while Redis is away (OPERATIONS 5).  One in
    a directory that is not there (or not the node's) passed the check and the start, and
    the node only logged "cannot write the store cache" at each write: it was found out
    when Redis went away and the node could not start."""
    cfg = tmp_path / "dsbc.toml"
    cfg.write_text('[store]\nurl = "redis://127.0.0.1:1/0"\ncache_file = "/nonexistent/dir/index.cache"\n'
                   '[control]\nenabled = false\n[sip]\nenabled = false\n')
    for args in (("run", "--check"), ("run",)):
        proc = subprocess.run([sys.executable, "-m", "dsbc.cli", *args, "-c", str(cfg)],
                              capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip() == (
            f"dsbc: {cfg}:3: store.cache_file: directory /nonexistent/dir does not exist (make it: "
            "install -d -o dsbc -g dsbc /nonexistent/dir; or set store.cache_file to a file in a "
            "directory that exists)"), proc.stderr


def test_an_api_section_with_no_back_end_is_warned_about(tmp_path: Path) -> None:
    """Found by an audit: an [api] with its listen (or TLS, vhosts without URLs) but no back
    end anywhere started no API dispatcher, without a word: `--check` said ok, the port
    refused connections.  `--check` (and the start) now say so, naming the table."""
    cfg = tmp_path / "dsbc.toml"
    base = f'[store]\nurl = "sqlite:///{tmp_path / "loc.db"}"\n[control]\nenabled = false\n[sip]\nenabled = false\n'

    def check(api: str) -> str:
        cfg.write_text(base + api)
        r = subprocess.run([sys.executable, "-m", "dsbc.cli", "run", "--check", "-c", str(cfg)],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False)
        assert r.returncode == 0, r.stderr
        return r.stderr

    err = check(f'[api]\nlisten = ["127.0.0.1:{free_port("tcp")}"]\n')
    assert "dsbc.toml:7: api: no back end (" in err and "the API dispatcher does not run" in err, err
    assert "api" not in check("[api]\nenabled = false\n")  # said so
    assert "api" not in check("")  # a SIP-only node that never wrote [api]
